"""How much OpenMP's idle-thread policy matters on a shared machine: one decode-shaped bf16 linear, 2 threads,
OMP_WAIT_POLICY unset (libgomp spins, then sleeps) vs PASSIVE (idle threads sleep at once), each in a fresh process.

    python bench/omp_wait_policy.py [--repeats 3]

Why: torch's CPU build runs its intra-op threads on libgomp; a spinning thread on a machine whose cores are shared
with other busy processes burns the time slice the thread it waits for needs, so every parallel region (one per
operator) can take milliseconds. The rounds alternate (unset, PASSIVE, unset, ...) so drifting load hits both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import time, torch
torch.set_num_threads(2)
w = torch.randn(1536, 576).bfloat16(); x = torch.randn(1, 576).bfloat16()
for _ in range(50): torch.nn.functional.linear(x, w)
t = time.perf_counter()
for _ in range(1000): torch.nn.functional.linear(x, w)
print((time.perf_counter() - t) / 1000)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: the same (it takes seconds)")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, None)
    print("one [1, 576] x [576, 1536]^T bf16 linear, 2 threads, mean of 1000 calls per process")
    for r in range(a.repeats):
        got = {}
        for policy in ("unset", "PASSIVE"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
            got[policy] = float(out.stdout.strip().splitlines()[-1])
        print(
            f"round {r}: unset {got['unset'] * 1e6:8.1f} us, PASSIVE {got['PASSIVE'] * 1e6:8.1f} us, "
            f"unset / PASSIVE = {got['unset'] / got['PASSIVE']:.2f}x; load average {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
