"""Where a decode step's time goes: torch.profiler over the engine's target forward, split into matmuls, attention,
KV-cache writes/reads, elementwise work (norms, rotary, SiLU, residual adds, casts) and the Python between ops.

    python bench/decode_profile.py --threads 2 --batch-sizes 1 64            # SmolLM2-135M bf16, the lean forward
    python bench/decode_profile.py --compile on                               # the same through model.compile

One step = one `LeanForward` call feeding one token per row at the position after a prefilled prompt (what plain
decoding does each step; a verification step feeds K+1). The split counts the top-level operators the profiler
records (their CPU time including their children) by name; `python / dispatch` is the step's wall time minus the
time inside those operators: the interpreter and the framework between ops. Steps are profiled after warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from dopd.common.kvcache import SlotCache
from dopd.common.models import load_target
from dopd.prompts import encode_all, load_prompt_set, split_prompts

CATEGORIES = (
    ("matmul", ("linear", "addmm", "aten::mm", "matmul", "bmm", "_linear_pointwise", "mkldnn")),
    ("attention", ("scaled_dot_product", "attention")),
    ("kv cache", ("index_put", "index_select", "aten::index")),
    ("embedding", ("embedding",)),
    ("compiled kernels", ("compiled", "torchinductor", "cpp_fused", "inductor")),
)


def category(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "elementwise"


def step_fn(target, batch: int, prompt: list[int], compile_mode: str):
    """A closure doing one decode step of `batch` rows after `prompt` (prefilled once)."""
    from dopd.common.target_forward import LeanForward

    fwd = LeanForward(target.model, compile=compile_mode) if compile_mode != "off" else LeanForward(target.model)
    cfg = target.model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    L = len(prompt)
    cache = SlotCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, d, L + 64, target.device, target.dtype)
    ids = torch.tensor([prompt[:-1]] * batch, device=target.device)
    fwd(ids, torch.arange(L - 1).expand(batch, L - 1), cache, None, L - 1, causal=True, want_logits=False)
    last = torch.tensor([[prompt[-1]]] * batch, device=target.device)
    pos = torch.full((batch, 1), L - 1, device=target.device)

    def step():
        return fwd(last, pos, cache, None, L).logits

    return step


def profile(step, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(3):
        step()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    split = defaultdict(float)
    ops = defaultdict(float)
    for e in prof.events():
        if e.cpu_parent is None and e.device_type.name == "CPU" and not e.name.startswith("ProfilerStep"):
            split[category(e.name)] += e.cpu_time_total / 1e6 / steps
            ops[e.name] += e.cpu_time_total / 1e6 / steps
    # the same steps without the profiler (its own cost inflates the Python share)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    bare = (time.perf_counter() - t0) / steps
    inside = sum(split.values())
    split["python / dispatch"] = max(wall - inside, 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_s": wall, "bare_s": bare, "split": dict(split), "top_ops": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", default="off", help="model.compile for the forward: off | on")
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 5 steps per batch size")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from dopd.common.hardware import bench_start

    bench_start(a, dict(steps=5))
    target = load_target(a.target, "cpu", a.dtype, quiet=True)
    sp = split_prompts(load_prompt_set("champ-problems"), 4, 0, "champ-problems")
    ids, _ = encode_all(target.tokenizer, sp.eval, 1024, drop_long=False)
    prompt = (sum(ids, []) * 4)[: a.prompt_tokens]
    print(
        f"target {a.target} {a.dtype}, lean forward, compile={a.compile}, {torch.get_num_threads()} threads, "
        f"one decode step after a {len(prompt)}-token context, {a.steps} profiled steps"
    )
    out = []
    for b in a.batch_sizes:
        r = profile(step_fn(target, b, prompt, a.compile), a.steps)
        r["batch"] = b
        out.append(r)
        parts = ", ".join(f"{k} {v * 1e3:.1f} ms ({v / r['wall_s']:.0%})" for k, v in sorted(r["split"].items()))
        print(f"batch {b:3d}: step {r['wall_s'] * 1e3:.1f} ms profiled, {r['bare_s'] * 1e3:.1f} ms bare; {parts}")
        print("   top ops: " + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in r["top_ops"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
