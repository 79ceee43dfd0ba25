"""What model.compile costs and gives: seconds to compile cold (empty inductor cache) and warm (a second process on the
same machine, the cache under DOPD_CACHE/inductor filled by the first), and the eager vs compiled decode step.

    python bench/compile_cost.py --threads 2                  # SmolLM2-135M bf16, batch 1 and 64

Each phase runs in a fresh process (so nothing compiled stays in memory) with TORCHINDUCTOR_CACHE_DIR pointing at
one new directory: `cold` starts from it empty, `warm` reuses what `cold` wrote. A phase loads the target, times
the first compiled decode step at each batch size (compiling included) and then the best of 8 steps, eager and
compiled, side by side in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def phase(target: str, dtype: str, batches: list[int], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from dopd.common.kvcache import SlotCache
    from dopd.common.models import load_target
    from dopd.common.target_forward import LeanForward

    t = load_target(target, "cpu", dtype, quiet=True)
    cfg = t.model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    L = 128
    eager = LeanForward(t.model)
    t0 = time.perf_counter()
    comp = LeanForward(t.model, compile="on")
    out = {"build_s": time.perf_counter() - t0, "rows": []}
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, L), generator=torch.Generator().manual_seed(0))
        row = {"batch": b}
        for name, fwd in (("compiled", comp), ("eager", eager)):
            cache = SlotCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, d, L + 16, "cpu", t.dtype)
            fwd(ids[:, :-1], torch.arange(L - 1).expand(b, L - 1), cache, None, L - 1, causal=True)
            pos = torch.full((b, 1), L - 1)
            t0 = time.perf_counter()
            fwd(ids[:, -1:], pos, cache, None, L)
            row[f"{name}_first_s"] = time.perf_counter() - t0
            best = float("inf")
            for i in range(8):
                t0 = time.perf_counter()
                fwd(ids[:, -1:], pos + i, cache, None, L + i)
                best = min(best, time.perf_counter() - t0)
            row[f"{name}_step_s"] = best
        out["rows"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: batch 1 only")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(phase(a.target, a.dtype, a.batch_sizes, a.threads)))
        return
    from dopd.common.hardware import bench_start

    bench_start(a, dict(batch_sizes=[1]))
    print(f"target {a.target} {a.dtype}, {a.threads} threads, one decode step after 127 tokens")
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--phase", name, "--target", a.target, "--dtype", a.dtype,
                   "--threads", str(a.threads), "--batch-sizes", *map(str, a.batch_sizes)]  # fmt: skip
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{name} phase failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - t0
            res[name] = r
            for row in r["rows"]:
                print(
                    f"{name}: batch {row['batch']:3d}: first compiled step {row['compiled_first_s']:6.1f} s "
                    f"(compiling included); step eager {row['eager_step_s'] * 1e3:6.1f} ms, compiled "
                    f"{row['compiled_step_s'] * 1e3:6.1f} ms = {row['eager_step_s'] / row['compiled_step_s']:.2f}x"
                )
            print(f"{name}: whole process {r['process_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
