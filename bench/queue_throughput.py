"""Records/s and MB/s through one queue shard: in process, and as a Ray actor fed by a producer actor.

    python bench/queue_throughput.py

Records are shaped like the SmolLM2 EAGLE-3 ones (250 tokens, 3 x 576 bf16 features per position, 100 blocks of
K=4 with the target's top-16). Every put decodes and validates the record (that is what protects learners from
malformed bytes), so this measures the real per-record cost, not a memcpy.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from dopd.common.queue import QueueShard
from dopd.common.record import Blocks, ExperienceRecord, encode_record


def smollm2_like_record(seed: int, n: int = 250, F: int = 3 * 576, M: int = 100, K: int = 4, k: int = 16) -> bytes:
    g = np.random.default_rng(seed)
    b = Blocks(
        anchor=np.sort(g.integers(100, n, M)).astype(np.int32), draft_tokens=g.integers(0, 49152, (M, K)).astype(np.int32),
        draft_logprobs=-g.exponential(size=(M, K)).astype(np.float32), target_topk_ids=g.integers(0, 49152, (M, K, k)).astype(np.int32),
        target_topk_probs=g.random((M, K, k)).astype(np.float32) / k, target_tail=g.random((M, K)).astype(np.float32) * 0.4,
        target_draft_prob=g.random((M, K)).astype(np.float32), accept_mask=g.random((M, K)) < 0.5, source=g.integers(0, 2, M).astype(np.uint8),
        streams=np.full(M, 3, dtype=np.uint8),
    )  # fmt: skip
    feats = torch.randn(n - 1, F).to(torch.bfloat16)
    return encode_record(ExperienceRecord(f"p{seed}", g.integers(0, 49152, n).astype(np.int32), 100, b, feats, seq_no=seed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=400)
    a = ap.parse_args()
    recs = [smollm2_like_record(i) for i in range(20)]
    size = sum(map(len, recs)) / len(recs)
    print(f"record size {size / 2**20:.2f} MiB")
    q = QueueShard(0, max_bytes=2**34)
    t0 = time.perf_counter()
    for i in range(a.records):
        assert q.put(recs[i % len(recs)]) == "ok"
        if i % 8 == 7:
            q.get(8, 0)
    dt = time.perf_counter() - t0
    print(f"in process  : {a.records / dt:8.1f} records/s  {a.records * size / dt / 2**20:8.1f} MiB/s  (put with validation + get)")

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(address="local", num_cpus=3, object_store_memory=1 << 30, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    Shard = ray.remote(num_cpus=0)(QueueShard)
    shard = Shard.remote(0, 2**34)

    @ray.remote(num_cpus=1)
    def produce(shard, data, n):
        for i in range(n):
            while ray.get(shard.put.remote(data[i % len(data)])) != "ok":
                time.sleep(0.01)
        return n

    @ray.remote(num_cpus=1)
    def consume(shard, n):
        got = 0
        while got < n:
            b = ray.get(shard.get.remote(8, 0))
            got += len(b)
            if not b:
                time.sleep(0.005)
        return got

    ray.get(shard.get_stats.remote())
    t0 = time.perf_counter()
    ray.get([produce.remote(shard, recs, a.records), consume.remote(shard, a.records)])
    dt = time.perf_counter() - t0
    print(f"Ray actors  : {a.records / dt:8.1f} records/s  {a.records * size / dt / 2**20:8.1f} MiB/s  (producer task -> shard actor -> consumer task)")
    ray.shutdown()


if __name__ == "__main__":
    main()
