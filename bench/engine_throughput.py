"""Engine tokens/s against Hugging Face `generate` (greedy), same model, same prompts, batch 1 and 16.

    python bench/engine_throughput.py                       # CPU, SmolLM2-135M fp32
    python bench/engine_throughput.py --device cuda --dtype bfloat16

Rows: HF generate (dynamic cache), the dopd engine as plain target decoding (K=0: slot cache, continuous
batching), and the dopd engine with speculative decoding (a drafter directory, e.g. one trained by
`dopd experiment plateau`, or a fresh `init-eagle3` which accepts ~nothing). Counted: new tokens up to and
including EOS, over wall time, after one warm-up call per configuration. Every output is also checked against
HF greedy (identical token ids), so a faster row is never a wrong row.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dopd.common.drafters import drafter_for_target
from dopd.common.models import load_target
from dopd.common.prompts import encode_all, load_prompt_set, split_prompts
from dopd.common.specdec import DecodeSettings, SpecEngine


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
            g = target.model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new, do_sample=False, eos_token_id=target.eos_token_ids, pad_token_id=pad)
        for row in g[:, L:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in target.eos_token_ids), len(row))
            outs.append(row[:cut])
            n_tokens += cut
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    return outs, n_tokens / (time.perf_counter() - t0)


def engine(target, drafter, prompts, batch, max_new, K):
    s = DecodeSettings(block_size=K, max_new_tokens=max_new, batch_size=batch)
    res, st = SpecEngine(target, drafter).generate(prompts, s)
    return [r.output_ids for r in res], st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", default="init-eagle3", help="a saved drafter directory or init-eagle3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    target = load_target(a.target, a.device, a.dtype)
    sp = split_prompts(load_prompt_set("champ-problems"), a.num_prompts, 0, "champ-problems")
    prompts, _ = encode_all(target.tokenizer, sp.eval, 1024, drop_long=False)
    drafter = drafter_for_target(a.drafter, target)
    rows = []
    for b in a.batch_sizes:
        ps = prompts if b > 1 else prompts[: max(2, a.num_prompts // 4)]
        hf_generate(target, ps[:b], b, 8)  # warm-up
        ref, hf_tps = hf_generate(target, ps, b, a.max_new_tokens)
        rows.append({"method": "hf_generate", "batch": b, "tokens_per_s": hf_tps, "tau": None, "identical_to_hf": True})
        engine(target, None, ps[:b], b, 8, 0)
        out, st = engine(target, None, ps, b, a.max_new_tokens, 0)
        rows.append({"method": "engine_plain", "batch": b, "tokens_per_s": st.tokens_per_s, "tau": None, "identical_to_hf": out == ref})
        engine(target, drafter, ps[:b], b, 8, a.block_size)
        out, st = engine(target, drafter, ps, b, a.max_new_tokens, a.block_size)
        rows.append({"method": f"engine_spec_K{a.block_size}", "batch": b, "tokens_per_s": st.tokens_per_s, "tau": st.tau, "identical_to_hf": out == ref})
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "hf_generate"}
    print(f"target {a.target} on {target.device} ({a.dtype}), drafter {a.drafter}, {a.num_prompts} prompts x {a.max_new_tokens} new tokens, greedy")
    print(f"{'method':22s} {'batch':>5s} {'tok/s':>9s} {'vs HF':>7s} {'tau':>6s}  identical")
    for r in rows:
        r["vs_hf"] = r["tokens_per_s"] / base[r["batch"]]
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        print(f"{r['method']:22s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {r['vs_hf']:6.2f}x {tau:>6s}  {r['identical_to_hf']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
