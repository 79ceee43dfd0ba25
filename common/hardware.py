"""What machine this is, and which dtype it computes fastest: the CPU's model and flags, and `dtype=auto` by measurement.

Why measured: the machines dopd is given differ (an Intel Xeon with AMX-BF16, an AMD EPYC Zen 4 with AVX512-BF16 but
no AMX), and a flag says only that bf16 *runs*, not that it is faster than fp32 at the shapes the engine feeds
(decode steps of one to a few hundred rows). `auto` therefore times the target's own matmul shapes in both dtypes
once per machine (about a second), keeps bf16 only where it is faster by a margin, and caches the decision under
`DOPD_CACHE` keyed by the CPU model, its flags and the torch version (a new torch or another CPU measures again).
Every bench prints `describe()` first, so a committed number always names the machine it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# the flags that decide reduced-precision speed on x86 (AMX tiles, AVX512 bf16/fp16 dot products)
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")
# bf16 is chosen only when its measured step is at most this share of fp32's (a tie keeps fp32, the exact reference)
BF16_MARGIN = 0.9
DTYPE_PROBE_VERSION = 1


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """`lscpu`'s model name (from /proc/cpuinfo), else what `platform` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """Which of `CPU_FLAGS` this CPU reports."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in CPU_FLAGS if f in have]


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> str:
    """One line naming the machine: CPU model, flags, cores, torch and its threads, and the load average now."""
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (
        f"machine: {cpu_model()}; flags {' '.join(cpu_flags()) or '(none of ' + ', '.join(CPU_FLAGS) + ')'}; "
        f"{cores()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average at start {load}"
    )


def machine_key() -> str:
    """What a measured decision depends on: CPU model, flags, torch version (a short hash)."""
    ident = json.dumps([cpu_model(), cpu_flags(), torch.__version__, DTYPE_PROBE_VERSION])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# dtype=auto by measurement


def choose_dtype(timings: dict[str, float], margin: float = BF16_MARGIN) -> tuple[str, str]:
    """From measured seconds per probe {"float32": s, "bfloat16": s} (None/missing bf16 = it does not run), pick
    the dtype and say why. bf16 wins only at <= `margin` of fp32's time."""
    fp32 = timings.get("float32")
    if fp32 is None or fp32 <= 0:
        raise ValueError(f"dtype probe timings need a positive float32 time, got {timings!r}")
    bf16 = timings.get("bfloat16")
    if bf16 is None:
        return "float32", "bf16 matmuls do not run here"
    ratio = bf16 / fp32
    if ratio <= margin:
        return "bfloat16", f"bf16 decode matmuls measured {1 / ratio:.2f}x as fast as fp32"
    return "float32", f"bf16 decode matmuls measured {1 / ratio:.2f}x fp32's speed (bf16 needs >= {1 / margin:.2f}x)"


def probe_timings(hidden: int = 576, inter: int = 1536, rows: tuple[int, ...] = (1, 64), repeats: int = 5) -> dict:
    """Seconds of one decode-shaped step per dtype: for each row count, the q/k/v-like, gate/up and down matmuls of
    a layer of this width (SmolLM2-135M's by default), best of `repeats`."""
    out: dict[str, float | None] = {}
    g = torch.Generator().manual_seed(0)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ws = [
            torch.randn(o, i, generator=g).to(dt)
            for o, i in ((hidden * 2, hidden), (2 * inter, hidden), (hidden, inter))
        ]
        xs = [torch.randn(r, hidden, generator=g).to(dt) for r in rows]
        try:
            total = 0.0
            for x in xs:
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(8):
                        h = torch.nn.functional.linear(x, ws[0])
                        u = torch.nn.functional.linear(x, ws[1])
                        torch.nn.functional.linear(u[:, :inter], ws[2])
                    best = min(best, time.perf_counter() - t0)
                    del h
                total += best
            out[name] = total
        except RuntimeError:
            out[name] = None
    return out


def _dtype_cache() -> Path:
    from .pypi import cache_dir

    return cache_dir() / "hardware" / f"dtype-{machine_key()}.json"


_DECIDED: dict[str, tuple[str, str]] = {}


def auto_cpu_dtype(quiet: bool = False, probe=None) -> tuple[str, str]:
    """`dtype=auto` on CPU: (dtype, why), measured once per machine and cached under DOPD_CACHE (and in process)."""
    key = machine_key()
    if key in _DECIDED:
        return _DECIDED[key]
    path = _dtype_cache()
    decision = None
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            decision = (d["dtype"], d["why"] + " (cached)")
        except (json.JSONDecodeError, KeyError):
            decision = None
    if decision is None:
        timings = (probe or probe_timings)()
        dtype, why = choose_dtype(timings)
        why = f"{why} on {cpu_model()} with {torch.get_num_threads()} threads"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"dtype": dtype, "why": why, "timings": timings, "cpu": cpu_model(),
                                   "flags": cpu_flags(), "torch": torch.__version__}))  # fmt: skip
        tmp.replace(path)
        decision = (dtype, why)
    _DECIDED[key] = decision
    if not quiet:
        print(f"dopd: dtype=auto -> {decision[0]}: {decision[1]}", file=sys.stderr, flush=True)
    return decision


# ---------------------------------------------------------------------------------------------------------------
# benches


def bench_start(args, quick: dict | None = None) -> None:
    """What every bench in bench/ does first: with `--quick` take the `quick` settings (a run of under 3 minutes on
    2 cores), make stdout line-buffered (each row shows as it is measured, also through a pipe or `tee`), and print
    the machine line (`describe`) so the output names where it ran."""
    if getattr(args, "quick", False):
        for k, v in (quick or {}).items():
            setattr(args, k, v)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:  # a replaced stdout (pytest's capture)
        pass
    try:  # weight-loading progress bars would bury the rows
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    print(describe(), flush=True)
    if getattr(args, "quick", False):
        print(f"--quick: {', '.join(f'{k}={v}' for k, v in (quick or {}).items()) or 'same as the defaults'}")
