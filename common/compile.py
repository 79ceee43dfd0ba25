"""`model.compile`: the target's decode and verification steps through `torch.compile`, its artefacts cached on disk.

What is compiled: `LeanForward`'s step over the slot cache (common/target_forward.py `LeanCore`), the whole
Llama-family stack as one graph: q/k/v, the rotary embedding, the cache writes, SDPA over the used cache, SiLU-gated
MLP, the norms and the head. On CPU inductor emits C++/OpenMP kernels that fuse the elementwise work (RMSNorm,
rotary, SiLU * up, residual adds, casts; optionally, with `freezing`, it prepacks frozen weights for oneDNN); on CUDA
the mode is `reduce-overhead` (CUDA graphs). Shapes are dynamic (`dynamic=True`): batch rows, fed tokens and cache
length are symbols, so one graph serves every batch size above one and every cache length; torch specialises sizes
0 and 1, so a run compiles a handful of graphs (one-row and many-row batches, one fed token and K + 1) and no more.

Where the compile is paid: inductor's on-disk caches (the FX-graph cache and its compiled kernels) live under
`DOPD_CACHE/inductor` (`TORCHINDUCTOR_CACHE_DIR`, unless the user set it), so a second process on the same machine
loads the compiled kernels instead of generating and compiling C++ again; `bench/compile_cost.py` prints the cold
and warm seconds.

`auto` compiles where a measured check says it pays: `decide_auto` (with `target_forward.measure_steps`) times the eager and the compiled step of this
target at one and at many rows, once per machine, target and dtype, and caches the verdict next to the kernels.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

MODES = ("auto", "on", "off")
# compiled must be at most this share of eager's step time for `auto` to turn it on
AUTO_MARGIN = 0.9


def cache_root() -> Path:
    from .pypi import cache_dir

    return cache_dir() / "inductor"


def setup_caches() -> Path:
    """Point inductor's on-disk caches under DOPD_CACHE (unless TORCHINDUCTOR_CACHE_DIR is set) and turn the
    FX-graph cache on. Returns the directory."""
    root = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root())))
    root.mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as ic

    ic.fx_graph_cache = True
    return root


def compile_step(fn, device: torch.device, freezing: bool | None = None):
    """`fn` through torch.compile with the settings above (dynamic shapes; CUDA: CUDA graphs). On CPU the weights
    stay graph inputs unless DOPD_COMPILE_FREEZING=1 (inductor's freezing: folded, prepacked constants). Why not
    frozen by default: measured on SmolLM2 bf16 (Intel Xeon, AMX), frozen and unfrozen steps ran alike (batch 1:
    43 vs 45 ms; batch 64: 121 vs 111 ms, different loads), but a frozen graph bypasses the FX-graph cache (every
    process compiles again: 77 + 105 s cold for the two plain-decoding graphs, against 45 + 79 s unfrozen, which
    a second process loads from the cache)."""
    setup_caches()
    import torch._inductor.config as ic

    if device.type == "cpu":
        if freezing is None:
            freezing = os.environ.get("DOPD_COMPILE_FREEZING", "0") == "1"
        ic.freezing = freezing  # frozen weights: constant-folded and prepacked for oneDNN by inductor
        ic.cpp.weight_prepack = freezing
        return torch.compile(fn, dynamic=True, fullgraph=True)
    return torch.compile(fn, dynamic=True, fullgraph=True, mode="reduce-overhead")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown model.compile '{mode}' ({' | '.join(MODES)})")
    return mode


def choose(eager_s: dict[int, float], compiled_s: dict[int, float], margin: float = AUTO_MARGIN) -> tuple[bool, str]:
    """From measured step seconds per row count (eager and compiled, same rows), whether `auto` compiles and why:
    only when the compiled step is at most `margin` of eager's at every measured row count."""
    if not eager_s or set(eager_s) != set(compiled_s):
        raise ValueError(
            f"compile check needs eager and compiled times for the same batch sizes: {eager_s}, {compiled_s}"
        )
    ratios = {b: compiled_s[b] / eager_s[b] for b in sorted(eager_s)}
    text = ", ".join(f"batch {b}: {1 / r:.2f}x" for b, r in ratios.items())
    if all(r <= margin for r in ratios.values()):
        return True, f"the compiled step measured faster than eager ({text})"
    return False, f"the compiled step is not faster by {1 / margin:.2f}x everywhere ({text})"


def _auto_path(key: str) -> Path:
    from .hardware import machine_key

    return cache_root() / f"auto-{machine_key()}-{key}.json"


def decide_auto(target, measure, quiet: bool = False) -> bool:
    """`model.compile=auto`: compile or not, by `measure(target) -> (eager_s, compiled_s)` (seconds per step by
    batch size; `target_forward.measure_steps`), once per machine x target x dtype x device, cached under
    DOPD_CACHE/inductor."""
    key = f"{target.fingerprint or target.name}-{str(target.dtype).replace('torch.', '')}-{target.device.type}"
    path = _auto_path(key)
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            on, why = bool(d["compile"]), d["why"] + " (cached)"
        except (json.JSONDecodeError, KeyError):
            path.unlink()
            return decide_auto(target, measure, quiet)
    else:
        eager_s, compiled_s = measure(target)
        on, why = choose(eager_s, compiled_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"compile": on, "why": why, "eager_s": eager_s, "compiled_s": compiled_s}))
        tmp.replace(path)
    if not quiet:
        print(f"dopd: model.compile=auto -> {'on' if on else 'off'}: {why}", file=sys.stderr, flush=True)
    return on
