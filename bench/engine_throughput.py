"""The target's text at the hardware's speed: HF `generate` vs the dopd engine, plain and speculative, fp32 vs bf16.

    python bench/engine_throughput.py --drafter runs/demo/drafter            # CPU, SmolLM2-135M, both dtypes
    python bench/engine_throughput.py --device cuda --dtypes bfloat16 --batch-sizes 1 64

One run prints, per dtype and batch size, tokens/s of
- `hf_generate`: Hugging Face `generate` (greedy, dynamic cache), the reference every ratio is taken against;
- `engine_hf_fwd`: the dopd engine (slot cache, continuous batching) driving HF's modules (`--forward hf`);
- `engine_lean_nopack`: the lean Llama-family forward (fused q/k/v and gate/up, SDPA over the used cache) with
  plain `F.linear` weights: the gain of the lean forward alone (reduced precision on CPU only);
- `engine_lean`: the same with the weights prepacked once for oneDNN: the gain of prepacking;
- `engine_lean_compiled`: the lean forward's decode steps through torch.compile (model.compile=on,
  common/compile.py); the warm-up call's seconds (compiling included) are printed under the row;
- `spec_K<k>`: speculative decoding with the drafter (lean forward), `spec_K<k>_hf_fwd` over HF's modules and
  `spec_K<k>_compiled` with the compiled lean forward;
then the teacher-forced prefill (what SFT data and held-out texts cost) with both forwards, and the roofline limit:
the larger of (FLOPs / measured matmul peak) and (bytes moved / measured memory bandwidth) per step, printed as
the share of that limit each row reaches. Counted: new tokens up to and including EOS over wall time, after one
warm-up call per configuration. Every output is compared with HF's greedy output: `same` is the share of prompts
whose tokens are identical (1.00 = all; fp32 must be 1.00, bf16's batch-shape rounding may flip a near-tie).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch

from dopd.common.drafters import drafter_for_target
from dopd.common.greedy import prefill
from dopd.common.hardware import bench_start, describe
from dopd.common.models import load_target
from dopd.common.specdec import DecodeSettings, SpecEngine
from dopd.common.target_forward import HFForward, LeanForward
from dopd.prompts import encode_all, load_prompt_set, split_prompts


def hf_generate(target, prompts, batch, max_new):
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else target.eos_token_ids[0]
    outs, n_tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=target.device)
        am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=target.device)
        with torch.no_grad():
            g = target.model.generate(
                input_ids=ids,
                attention_mask=am,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=target.eos_token_ids,
                pad_token_id=pad,
            )
        for row in g[:, L:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in target.eos_token_ids), len(row))
            outs.append(row[:cut])
            n_tokens += cut
    _sync(target)
    return outs, n_tokens / (time.perf_counter() - t0)


def _sync(target):
    if target.device.type == "cuda":
        torch.cuda.synchronize()


def with_forward(target, fwd):
    return dataclasses.replace(target, _forward=fwd)


def engine(target, drafter, prompts, batch, max_new, K):
    s = DecodeSettings(block_size=K, max_new_tokens=max_new, batch_size=batch)
    res, st = SpecEngine(target, drafter).generate(prompts, s)
    _sync(target)
    return [r.output_ids for r in res], st


def hardware(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured matmul peak (GFLOP/s, a 2048^3 matmul, best of 5) and memory bandwidth (GB/s, a 512 MiB copy)."""
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    x = torch.empty(1 << 27, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    bw = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        bw = min(bw, time.perf_counter() - t0)
    return {"matmul_gflops": 2 * n**3 / best / 1e9, "bandwidth_gbs": 2 * x.numel() * 4 / bw / 1e9}


def limit_tok_s(target, hw: dict, batch: int, ctx: float, tokens_per_step: float = 1.0, fed: int = 1) -> float:
    """Roofline tokens/s of plain decoding at `batch` rows with `ctx` tokens of context: per step every weight is
    read once and each row reads its K/V; FLOPs are 2 per weight per fed token plus attention."""
    cfg = target.model.config
    es = target.model.dtype.itemsize
    params = sum(p.numel() for n, p in target.model.named_parameters() if "embed_tokens" not in n)
    if getattr(cfg, "tie_word_embeddings", False):
        params += target.model.get_input_embeddings().weight.numel()  # the head reads the tied matrix
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * es
    flops = batch * fed * (2 * params + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * d * ctx)
    bytes_ = params * es + batch * ctx * kv_per_tok
    step = max(flops / (hw["matmul_gflops"] * 1e9), bytes_ / (hw["bandwidth_gbs"] * 1e9))
    return batch * tokens_per_step / step


def same(out, ref) -> float:
    return sum(a == b for a, b in zip(out, ref)) / max(len(ref), 1)


QUICK = dict(dtypes=["bfloat16"], batch_sizes=[1, 64], prompts_per_row=1, max_new_tokens=24, prefill_texts=8)


def fmt_row(r: dict) -> str:
    tau = f"{r['tau']:.2f}" if r["tau"] else "-"
    vs = f"{r['vs_hf']:6.2f}x" if r["vs_hf"] is not None else "      -"
    lim = f"{r['vs_limit']:7.0%}" if r["vs_limit"] is not None else "      -"
    sm = f"{r['same_as_hf']:.2f}" if r["same_as_hf"] is not None else "-"
    return (
        f"{r['dtype']:9s} {r['method']:22s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {vs} {lim:>8s} {tau:>6s} {sm:>5s}"
    )


HEADER = (
    f"{'dtype':9s} {'method':22s} {'batch':>5s} {'tok/s':>9s} {'vs HF':>7s} {'of limit':>8s} {'tau':>6s} {'same':>5s}"
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument(
        "--drafter",
        default="init-eagle3",
        help="a saved drafter directory (e.g. `make run`'s runs/demo/drafter) or init-eagle3",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument(
        "--prompts-per-row",
        type=int,
        default=2,
        help="prompts decoded per batch row (continuous batching refills rows)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--prefill-texts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--compile",
        default="on",
        choices=["on", "off"],
        help="also measure the lean forward through torch.compile (model.compile=on; common/compile.py)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="bf16 only, batch 1 and 64, one prompt per row, 24 new tokens, the lean engine (eager and compiled) "
        "and HF only, speculative rows at batch 1 (under 3 minutes on 2 cores, compile caches warm)",
    )
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def forwards(target, a: argparse.Namespace) -> tuple[dict, list, Any]:
    """The target forwards measured: plain decoding variants by name, the speculative ones (suffix, target), and the
    lean forward (also the prefill's)."""
    variants = {} if a.quick else {"engine_hf_fwd": with_forward(target, HFForward(target.model))}
    if target.dtype != torch.float32 and target.device.type == "cpu" and not a.quick:
        variants["engine_lean_nopack"] = with_forward(target, LeanForward(target.model, pack=False))
    lean = with_forward(target, LeanForward(target.model))
    variants["engine_lean"] = lean
    spec_variants = [("", lean)] + ([] if a.quick else [("_hf_fwd", variants["engine_hf_fwd"])])
    if a.compile == "on":
        compiled = with_forward(target, LeanForward(target.model, compile="on"))
        variants["engine_lean_compiled"] = compiled
        spec_variants.append(("_compiled", compiled))
    return variants, spec_variants, lean


def timed_engine(name: str, t, drafter, ps: list, b: int, new_tokens: int, K: int):
    """A warm-up call on the first b prompts (a compiled forward compiles its graphs here), then the measured one:
    (outputs, stats, warm-up seconds)."""
    t0 = time.perf_counter()
    engine(t, drafter, ps[:b], b, 4, K)
    warm = time.perf_counter() - t0
    out, st = engine(t, drafter, ps, b, new_tokens, K)
    if "compiled" in name:
        print(f"  ({name} at batch {b}: warm-up call incl. compiling {warm:.1f} s)", flush=True)
    return out, st, warm


def prefill_rows(dt: str, a: argparse.Namespace, prompts: list, drafter, pre: list) -> list[dict]:
    """Teacher-forced prefill over target-length texts (prompt + answer), features of the drafter's layers."""
    texts = [(str(i), p + p[: a.max_new_tokens], len(p)) for i, p in enumerate(prompts[: a.prefill_texts])]
    ntok = sum(len(t) for _, t, _ in texts)
    rows = []
    for name, t in pre:
        prefill(t, drafter.feature_layers, texts[:2], 16)
        t0 = time.perf_counter()
        prefill(t, drafter.feature_layers, texts, 16)
        tps = ntok / (time.perf_counter() - t0)
        rows.append({"dtype": dt, "method": name, "batch": 8, "tokens_per_s": tps, "vs_hf": None,
                     "vs_limit": None, "tau": None, "same_as_hf": None})  # fmt: skip
        print(fmt_row(rows[-1]), flush=True)
    return rows


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    bench_start(a, QUICK)
    print(
        f"target {a.target} on {a.device}, {torch.get_num_threads()} threads, drafter {a.drafter}, "
        f"{a.max_new_tokens} new tokens, greedy, K={a.block_size}{' (--quick)' if a.quick else ''}",
        flush=True,
    )
    n_prompts = max(a.batch_sizes) * a.prompts_per_row
    rows, meta = [], {"args": vars(a), "threads": torch.get_num_threads(), "machine": describe()}
    for dt in a.dtypes:
        target = load_target(a.target, a.device, dt, quiet=True, forward="hf")
        hw = hardware(target.device, target.dtype)
        meta[dt] = hw
        print(
            f"{dt}: measured matmul peak {hw['matmul_gflops']:.0f} GFLOP/s, memory bandwidth "
            f"{hw['bandwidth_gbs']:.1f} GB/s",
            flush=True,
        )
        print(HEADER, flush=True)
        sp = split_prompts(load_prompt_set("champ-problems"), n_prompts, 0, "champ-problems")
        prompts, _ = encode_all(target.tokenizer, sp.eval, 1024, drop_long=False)
        drafter = drafter_for_target(a.drafter, target)
        variants, spec_variants, lean = forwards(target, a)
        for b in a.batch_sizes:
            n_b1 = 2 if a.quick else 4
            ps = prompts[: max(n_b1, b * a.prompts_per_row)] if b > 1 else prompts[:n_b1]
            ctx = sum(map(len, ps)) / len(ps) + a.max_new_tokens / 2
            hf_generate(target, ps[:b], b, 4)  # warm-up
            ref, hf_tps = hf_generate(target, ps, b, a.max_new_tokens)
            lim = limit_tok_s(target, hw, b, ctx)

            def add(method, tps, tau=None, match=1.0, extra=None, dt=dt, b=b, hf_tps=hf_tps, lim=lim):
                rows.append({"dtype": dt, "method": method, "batch": b, "tokens_per_s": tps, "vs_hf": tps / hf_tps,
                             "vs_limit": tps / lim, "tau": tau, "same_as_hf": match, **(extra or {})})  # fmt: skip
                print(fmt_row(rows[-1]), flush=True)

            add("hf_generate", hf_tps)
            for name, t in variants.items():
                out, st, warm = timed_engine(name, t, None, ps, b, a.max_new_tokens, 0)
                add(name, st.tokens_per_s, match=same(out, ref), extra={"warmup_s": warm})
            if a.quick and b > 1:
                continue  # --quick: speculative rows at batch 1 only
            for name, t in spec_variants:
                out, st, warm = timed_engine(name, t, drafter, ps, b, a.max_new_tokens, a.block_size)
                add(
                    f"spec_K{a.block_size}{name}",
                    st.tokens_per_s,
                    st.tau,
                    same(out, ref),
                    {"draft_s": st.draft_s, "target_s": st.target_s, "warmup_s": warm},
                )
        pre = [("prefill_lean", lean)] + ([] if a.quick else [("prefill_hf_fwd", variants["engine_hf_fwd"])])
        rows.extend(prefill_rows(dt, a, prompts, drafter, pre))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
