"""Records/s and MiB/s of the record codec, of one queue shard in process, and through a shard actor on Ray.

    python bench/queue_throughput.py [--codec-only] [--baseline DIR]

Records are shaped like the SmolLM2 EAGLE-3 ones (250 tokens, 3 x 576 bf16 features per position, 100 blocks of
K=4 with the target's top-16). "decode" is the full decode with every check (what a learner does, once per
record); a shard's put reads only the record's header.

`--baseline DIR` measures another checkout's codec and shard in the same process, interleaved round by round with
this one's (A B A B ...), and prints the ratio of each round: a shared, drifting machine moves both sides of a pair
alike. Make DIR with e.g. `git worktree add /tmp/base <rev>` or `git archive <rev> | tar -x -C /tmp/base`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dopd import queue as new_queue
from dopd.common import record as new_record


def load_checkout(root: str):
    """Another checkout's common/record.py and dopd/queue.py, imported as the package `baseline_common`."""
    spec = importlib.util.spec_from_file_location(
        "baseline_common",
        Path(root) / "common" / "__init__.py",
        submodule_search_locations=[str(Path(root) / "common")],
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["baseline_common"] = pkg
    spec.loader.exec_module(pkg)
    import baseline_common.queue as q  # noqa: E402
    import baseline_common.record as r  # noqa: E402

    return r, q


def smollm2_like(rec_mod, seed: int, n: int = 250, F: int = 3 * 576, M: int = 100, K: int = 4, k: int = 16):
    g = np.random.default_rng(seed)
    b = rec_mod.Blocks(
        anchor=np.sort(g.integers(100, n, M)).astype(np.int32), draft_tokens=g.integers(0, 49152, (M, K)).astype(np.int32),
        draft_logprobs=-g.exponential(size=(M, K)).astype(np.float32), target_topk_ids=g.integers(0, 49152, (M, K, k)).astype(np.int32),
        target_topk_probs=g.random((M, K, k)).astype(np.float32) / (2 * k), target_tail=g.random((M, K)).astype(np.float32) * 0.4,
        target_draft_prob=g.random((M, K)).astype(np.float32), accept_mask=g.random((M, K)) < 0.5, source=g.integers(0, 2, M).astype(np.uint8),
        streams=np.full(M, 3, dtype=np.uint8),
    )  # fmt: skip
    feats = torch.randn(n - 1, F, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return rec_mod.ExperienceRecord(f"p{seed}", g.integers(0, 49152, n).astype(np.int32), 100, b, feats, seq_no=seed)


def smollm2_like_record(seed: int, **kw) -> bytes:
    return new_record.encode_record(smollm2_like(new_record, seed, **kw))


def codec_rounds(rec_mod, q_mod, objs: list, records: int) -> dict[str, float]:
    """Seconds for `records` encodes, decodes and shard put+gets (fresh record ids: a shard accepts an id once)."""
    data = [rec_mod.encode_record(o) for o in objs]
    t0 = time.perf_counter()
    for i in range(records):
        rec_mod.encode_record(objs[i % len(objs)])
    t1 = time.perf_counter()
    for i in range(records):
        rec_mod.decode_record(data[i % len(data)])
    t2 = time.perf_counter()
    q = q_mod.QueueShard(0, max_bytes=2**34)
    fresh = [rec_mod.encode_record(dataclasses.replace(objs[i % len(objs)], seq_no=10**6 + i)) for i in range(records)]
    t3 = time.perf_counter()
    for i, d in enumerate(fresh):
        assert q.put(d) == "ok"
        if i % 8 == 7:
            q.get(8, 0)
    return {"encode": t1 - t0, "decode": t2 - t1, "shard": time.perf_counter() - t3}


WHAT = {
    "encode": "record -> bytes, on the actor",
    "decode": "bytes -> validated record",
    "shard": "shard put + get, in process",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=40, help="records per round and phase")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--codec-only", action="store_true", help="skip the Ray measurement")
    ap.add_argument("--baseline", help="another checkout: measure its codec too, interleaved, and print the ratios")
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 10 records x 3 rounds")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(records=10, rounds=3))
    sides = {"this": (new_record, new_queue)}
    if a.baseline:
        sides["baseline"] = load_checkout(a.baseline)
    objs = {name: [smollm2_like(r, i) for i in range(20)] for name, (r, _) in sides.items()}
    size = sum(len(new_record.encode_record(o)) for o in objs["this"]) / 20
    print(
        f"record size {size / 2**20:.2f} MiB; {a.rounds} rounds of {a.records} records per phase"
        + (" (this, baseline interleaved)" if a.baseline else "")
    )
    times: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(a.rounds):
        for name, (r, q) in sides.items():
            times[name].append(codec_rounds(r, q, objs[name], a.records))
    for phase in ("encode", "decode", "shard"):
        for name in sides:
            dt = statistics.median(t[phase] for t in times[name])
            print(
                f"{phase:<7} {name:<9}: {a.records / dt:9.1f} records/s {a.records * size / dt / 2**20:9.1f} MiB/s  (median round; {WHAT[phase]})"
            )
        if a.baseline:
            ratios = [b[phase] / t[phase] for t, b in zip(times["this"], times["baseline"])]
            print(
                f"{phase:<7} speed-up : {statistics.median(ratios):9.2f}x median of paired rounds (min {min(ratios):.2f}, max {max(ratios):.2f})"
            )
    recs = [new_record.decode_record(new_record.encode_record(o)) for o in objs["this"]]
    t0 = time.perf_counter()
    for i in range(a.records * a.rounds):
        new_record.check_values(recs[i % len(recs)], vocab_size=49152)
    per = (time.perf_counter() - t0) / (a.records * a.rounds)
    dec = statistics.median(t["decode"] for t in times["this"]) / a.records
    print(f"value checks alone: {per * 1e3:.3f} ms per record, {100 * per / dec:.0f}% of this side's decode")
    if not a.codec_only:
        ray_round(objs["this"], a.records * a.rounds, size)


def ray_round(objs: list, n: int, size: float) -> None:
    """n records through a real shard actor on a local Ray: one producing task (the actor's encode and batched
    puts), one consuming task (a learner rank's waiting gets and decode); prints records/s and MiB/s."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(
        address="local",
        num_cpus=3,
        object_store_memory=1 << 30,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    QueueShard, encode_record, decode_record = new_queue.QueueShard, new_record.encode_record, new_record.decode_record
    Shard = ray.remote(**QueueShard.RAY_OPTIONS)(QueueShard)
    shard = Shard.remote(0, 2**34)

    @ray.remote(num_cpus=1)
    def produce(shard, objs, n):  # an actor: encode, one batched put per 8 records (waiting inside the shard if full)
        for c in range(0, n, 8):
            batch = [encode_record(dataclasses.replace(objs[i % len(objs)], seq_no=i)) for i in range(c, min(c + 8, n))]
            while batch:
                res = ray.get(shard.put_many.remote(batch, wait_s=1.0))
                batch = [d for d, r in zip(batch, res) if r == "full"]
        return n

    @ray.remote(num_cpus=1)
    def consume(shard, n):  # a learner rank: a waiting get per micro-batch of 8, then the one full decode
        got = 0
        while got < n:
            for d in ray.get(shard.get.remote(min(8, n - got), 0, 5.0)):
                decode_record(d)
                got += 1
        return got

    ray.get(shard.get_stats.remote())
    t0 = time.perf_counter()
    ray.get([produce.remote(shard, objs, n), consume.remote(shard, n)])
    dt = time.perf_counter() - t0
    print(
        f"Ray        : {n / dt:9.1f} records/s {n * size / dt / 2**20:9.1f} MiB/s  (encode, batched put -> shard actor -> waiting get, decode)"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
