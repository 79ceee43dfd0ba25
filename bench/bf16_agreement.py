"""What bf16 keeps and what it does not: speculative vs plain greedy output, and simulated vs engine tau, per dtype.

    python bench/bf16_agreement.py --drafter runs/demo/drafter --num-prompts 64

In fp32 speculative greedy output equals plain greedy output token for token and the simulated tau (the cached
text re-segmented by the drafter, `common/resegment.py`) equals the engine's tau exactly (the tests check both).
In bf16 a verification forward over K+1 tokens rounds differently from a one-token step, and the prefill that
feeds the simulation rounds differently from the verification forwards: a near-tie between the target's top two
tokens can flip, and so can the drafter's argmax over slightly different features. This prints how often, per dtype:
- `identical`: share of prompts whose speculative output equals plain decoding's, and the mean share of each
  answer before the first differing token;
- engine tau vs simulated tau over the same prompts, and their difference.
"""

from __future__ import annotations

import argparse
import json

from dopd.common.drafters import drafter_for_target
from dopd.common.evaluation import simulated_tau
from dopd.common.models import load_target
from dopd.common.specdec import DecodeSettings, SpecEngine
from dopd.prompts import encode_all, load_prompt_set, split_prompts


def agreeing_prefix(a: list[int], b: list[int]) -> float:
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return k / max(len(b), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", required=True, help="a trained drafter directory (e.g. runs/demo/drafter)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: 8 prompts x 48 tokens")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(num_prompts=8, max_new_tokens=48, batch_size=8))
    out = {"args": vars(a), "rows": []}
    print(
        f"target {a.target}, drafter {a.drafter}, {a.num_prompts} held-out champ-problems prompts x {a.max_new_tokens} tokens, K={a.block_size}, greedy"
    )
    print(
        f"{'dtype':9s} {'identical':>9s} {'agreeing prefix':>15s} {'engine tau':>10s} {'simulated':>9s} {'diff':>8s} {'steps':>6s}"
    )
    for dt in a.dtypes:
        t = load_target(a.target, a.device, dt, quiet=True)
        sp = split_prompts(load_prompt_set("champ-problems"), a.num_prompts, 0, "champ-problems")
        ids, _ = encode_all(t.tokenizer, sp.eval, 1024, drop_long=False)
        d = drafter_for_target(a.drafter, t)
        plain_s = DecodeSettings(block_size=0, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
        spec_s = DecodeSettings(block_size=a.block_size, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
        base = [r.output_ids for r in SpecEngine(t).generate(ids, plain_s)[0]]
        res, eng = SpecEngine(t, d).generate(ids, spec_s)
        spec = [r.output_ids for r in res]
        sim = simulated_tau(t, d, ids, spec_s)
        row = {
            "dtype": dt, "identical": sum(x == y for x, y in zip(spec, base)) / len(base),
            "agreeing_prefix": sum(agreeing_prefix(x, y) for x, y in zip(spec, base)) / len(base),
            "engine_tau": eng.tau, "simulated_tau": sim.tau, "engine_steps": eng.num_steps, "simulated_steps": sim.num_steps,
        }  # fmt: skip
        out["rows"].append(row)
        print(
            f"{dt:9s} {row['identical']:9.3f} {row['agreeing_prefix']:15.3f} {eng.tau:10.4f} {sim.tau:9.4f} {sim.tau - eng.tau:+8.4f} {eng.num_steps:6d}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
