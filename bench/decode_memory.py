"""Decoded memory per input byte: the worst case of the record decoder, on valid and on hostile inputs.

    python bench/decode_memory.py [--mib 63.9]

Each case builds one input of about --mib MiB (the default sits just inside the 64 MiB record limit) and decodes it
in a fresh process, measuring (a) the peak of Python and numpy allocations during the decode (tracemalloc) and
(b) the peak resident memory during the decode above the resident memory before it (VmHWM, reset through
/proc/self/clear_refs). Ratio = that peak / input bytes. The cases: valid records whose size is all features or
all blocks, a legal `meta` of long strings, and the attacks: `meta` of nested or wide empty containers (the old
decoder turned 63.9 MiB of them into +4.56 GB), a huge byte string under a wrong shape, and a valid-looking record
refused by its last check (everything decoded first).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import struct
import time
import tracemalloc
import zlib

import msgpack
import numpy as np
import torch

from dopd.common.errors import RecordError
from dopd.common.record import MAGIC, SCHEMA_VERSION, Blocks, ExperienceRecord, decode_record, encode_record

LIMIT = 64 * 2**20


def frame(body: bytes) -> bytes:
    head = struct.pack("<4sBBqqqqI", MAGIC, 1, SCHEMA_VERSION, 0, 0, 0, 0, len(body))
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def record(n: int, F: int, M: int = 4, K: int = 4, k: int = 8) -> ExperienceRecord:
    g = np.random.default_rng(0)
    b = Blocks(
        anchor=np.ones(M, np.int32), draft_tokens=np.zeros((M, K), np.int32), draft_logprobs=np.zeros((M, K), np.float32),
        target_topk_ids=np.zeros((M, K, k), np.int32), target_topk_probs=np.full((M, K, k), 0.5 / k, np.float32),
        target_tail=np.full((M, K), 0.5, np.float32), target_draft_prob=np.zeros((M, K), np.float32),
        accept_mask=np.zeros((M, K), bool), source=np.zeros(M, np.uint8), streams=np.full(M, 1, np.uint8),
    )  # fmt: skip
    feats = torch.from_numpy(g.standard_normal((n - 1, F), dtype=np.float32)).to(torch.bfloat16) if F else None
    return ExperienceRecord("p", np.zeros(n, np.int32), 1, b, feats)


def with_meta(meta_bytes: bytes) -> bytes:
    """A small valid record whose `meta` value is replaced by these raw msgpack bytes."""
    msg = msgpack.unpackb(encode_record(record(8, 4))[46:])
    del msg["meta"]
    raw = msgpack.packb(msg, use_bin_type=True)
    return frame(bytes([raw[0] + 1]) + raw[1:] + b"\xa4meta" + meta_bytes)


def build(case: str, size: int) -> bytes:
    if case == "valid: features":
        F = 1024
        return encode_record(record(size // (2 * F) - 64, F))
    if case == "valid: blocks":
        M = size // (4 * 8 * 13)  # K=4 positions x (k=8 ids + 8 probs + 5 more per-position values) x 4 bytes
        return encode_record(record(8, 4, M=M))
    if case == "legal meta: 16 strings of 64 KiB, + features":
        rec = record(size // 2048 - 600, 1024)
        rec.meta = {f"k{i}": "x" * 2**16 for i in range(16)}
        return encode_record(rec)
    if case == "attack: meta nested [[[...]]]":
        return with_meta(b"\x91" * size + b"\xc0")
    if case == "attack: meta one list of empty lists":
        return with_meta(b"\xdd" + size.to_bytes(4, "big") + b"\x90" * size)
    if case == "attack: meta map of nested maps":
        return with_meta(
            b"\xde\x00\x10" + b"".join(bytes([0xA1, 65 + i]) + b"\x81\xa0" * (size // 32) + b"\xc0" for i in range(16))
        )
    if case == "attack: huge bytes under a wrong shape":
        msg = msgpack.unpackb(encode_record(record(8, 4))[46:])
        msg["features"] = {"t": "bfloat16", "s": [7, 4], "b": b"\x00" * size}
        return frame(msgpack.packb(msg, use_bin_type=True))
    if case == "attack: all decoded, refused last (inf feature)":
        rec = record(size // 2048 - 64, 1024)
        rec.features[-1, -1] = float("inf")
        return encode_record(rec)
    raise ValueError(case)


CASES = [
    "valid: features", "valid: blocks", "legal meta: 16 strings of 64 KiB, + features", "attack: meta nested [[[...]]]",
    "attack: meta one list of empty lists", "attack: meta map of nested maps", "attack: huge bytes under a wrong shape",
    "attack: all decoded, refused last (inf feature)",
]  # fmt: skip


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(case: str, size: int, out) -> None:
    data = build(case, size)
    # first the resident peak (no tracemalloc bookkeeping), from a high-water mark reset just before the decode
    rss_before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        try:
            decode_record(data)
            result = "decoded"
        except RecordError as e:
            result = "RecordError: " + str(e)[:90]
        dt = time.perf_counter() - t0
        rss_peak = (_rss_kib("VmHWM") - rss_before) * 1024
    except OSError:
        result, dt, rss_peak = "", 0.0, -1
    tracemalloc.start()
    try:
        decode_record(data)
        result = result or "decoded"
    except RecordError as e:
        result = result or "RecordError: " + str(e)[:90]
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out.put(
        {"case": case, "bytes": len(data), "traced_peak": traced, "rss_peak": rss_peak, "seconds": dt, "result": result}
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=63.9)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 8 MiB inputs")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(mib=8.0))
    size = int(a.mib * 2**20)
    ctx = mp.get_context("spawn")
    rows = []
    print(
        f"{'case':<50} {'input MiB':>9} {'traced peak':>12} {'ratio':>6} {'RSS peak':>10} {'ratio':>6} {'s':>6}  result"
    )
    for case in CASES:
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(case, size, q))
        p.start()
        r = q.get()
        p.join()
        rows.append(r)
        mib = r["bytes"] / 2**20
        print(
            f"{case:<50} {mib:9.1f} {r['traced_peak'] / 2**20:9.1f} MiB {r['traced_peak'] / r['bytes']:6.2f} {r['rss_peak'] / 2**20:7.1f} MiB {r['rss_peak'] / r['bytes']:6.2f} {r['seconds']:6.3f}  {r['result']}"
        )
    worst = max(rows, key=lambda r: max(r["traced_peak"], r["rss_peak"]) / r["bytes"])
    ratio = max(worst["traced_peak"], worst["rss_peak"]) / worst["bytes"]
    print(
        f"worst ratio of decoded memory to input bytes: {ratio:.2f} ({worst['case']}); limit per record {LIMIT / 2**20:.0f} MiB"
    )
    print(f"(peak RSS of this parent process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
