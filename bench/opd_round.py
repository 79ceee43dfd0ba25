"""One Draft-OPD round, engine path vs re-segmentation path; `dopd eval` vs `dopd eval --simulate`. One run.

    python bench/opd_round.py                                  # CPU, SmolLM2-135M fp32, fresh drafters
    python bench/opd_round.py --drafter runs/demo/drafter      # a trained EAGLE-3 drafter (realistic tau)
    python bench/opd_round.py --device cuda --dtype bfloat16

Part 1 (records/s): the same prompts, seen before (their greedy text and prefill are cached, as for a prompt
revisited in a later epoch), rolled out into experience records by the shared recipe (`ExperienceMaker.records`)
with `rollout.path=engine` (speculative decoding step by step) and `rollout.path=auto` (re-segmentation of the
cached text), for EAGLE-3's official recipe [docs/recipes.md R10] (no target forward per round) and DFlash's (the drafted tails after a
first rejection scored by the target). Both paths produce the same records (tests/test_resegment.py).
Part 2 (seconds): held-out tau by decoding (the engine, no baseline) vs simulated from the cached text, same
drafter, same prompts; both taus are printed (they are equal by construction, and tested).
Timings are medians over --repeats, after one untimed warm-up call that also fills the caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dopd.actors.experience import ExperienceMaker
from dopd.common.drafters import drafter_for_target
from dopd.common.evaluation import quick_tau, simulated_tau
from dopd.common.load import load_config
from dopd.common.models import load_target
from dopd.common.specdec import DecodeSettings
from dopd.prompts import encode_all, load_prompt_set, split_prompts


def timed(fn, repeats: int) -> tuple[float, object]:
    out, ts = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", default=None, help="a saved EAGLE-3 drafter directory (default: a fresh one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per OPD round")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--eval-max-new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="under 3 minutes on 2 cores: 4 prompts per round, 8 held-out x 64 tokens, 1 repeat",
    )
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(prompts=4, eval_prompts=8, eval_max_new=64, repeats=1))
    torch.manual_seed(0)
    target = load_target(a.target, a.device, a.dtype)
    allp = load_prompt_set("champ")
    sp = split_prompts(allp, a.eval_prompts, 0, "champ")
    train_ids, train_p = encode_all(target.tokenizer, sp.train[: a.prompts], 384, drop_long=True)
    prompts = [(p.id, ids) for p, ids in zip(train_p, train_ids)]
    eval_ids, _ = encode_all(target.tokenizer, sp.eval, 384, drop_long=True)
    report: dict = {
        "target": a.target,
        "device": str(target.device),
        "dtype": a.dtype,
        "prompts": len(prompts),
        "max_new_tokens": a.max_new,
        "rounds": {},
    }

    print(
        f"Part 1: one OPD round of {len(prompts)} prompts x {a.max_new} new tokens (records/s, median of {a.repeats})"
    )
    print(f"{'recipe':46s} {'engine':>10s} {'resegment':>10s} {'ratio':>7s} {'tau':>6s}")
    for kind, K in (("eagle3", 4), ("dflash", 8)):
        init = a.drafter if (kind == "eagle3" and a.drafter) else f"init-{kind}"
        rows = {}
        for path in ("engine", "auto"):
            cfg = load_config(None, [
                f"drafter.kind={kind}", f"rollout.block_size={K}", f"rollout.max_new_tokens={a.max_new}", "rollout.batch_size=8",
                f"rollout.path={path}", f"model.device={a.device}", f"model.dtype={a.dtype}",
            ])  # fmt: skip
            drafter = drafter_for_target(init, target, seed=0)
            maker = ExperienceMaker(target, cfg)
            rng = np.random.default_rng(0)
            go = lambda maker=maker, drafter=drafter, rng=rng: maker.records(drafter, prompts, 1, 0, 0, 0, 0, rng)  # noqa: E731
            go()  # warm-up: fills the greedy-text and prefill caches (the "seen before" state)
            sec, (recs, st) = timed(go, a.repeats)
            rows[path] = {"seconds": sec, "records_per_s": len(recs) / sec, "tau": st.tau, "path": st.path}
        ratio = rows["auto"]["records_per_s"] / rows["engine"]["records_per_s"]
        name = f"{kind} K={K} ({'TTT, rejected stream off' if kind == 'eagle3' else 'blocks, rejected stream scored'})"
        print(
            f"{name:46s} {rows['engine']['records_per_s']:10.2f} {rows['auto']['records_per_s']:10.2f} {ratio:6.1f}x {rows['auto']['tau']:6.2f}"
        )
        report["rounds"][kind] = {**rows, "ratio": ratio, "block_size": K, "drafter": init}

    if not a.skip_eval:
        report["eval"] = heldout_part(a, target, eval_ids)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


def heldout_part(a: argparse.Namespace, target, eval_ids: list) -> dict:
    """Part 2: held-out tau by decoding (the engine) against simulated from the cached greedy text."""
    d = drafter_for_target(a.drafter or "init-eagle3", target, seed=0)
    s = DecodeSettings(block_size=4, max_new_tokens=a.eval_max_new, batch_size=16)
    ids = eval_ids[: a.eval_prompts]
    cache: dict = {}
    t0 = time.perf_counter()
    simulated_tau(target, d, ids, s, cache=cache)  # generates and caches the greedy text once
    first = time.perf_counter() - t0
    sec_sim, sim = timed(lambda: simulated_tau(target, d, ids, s, cache=cache), a.repeats)
    sec_eng, eng = timed(lambda: quick_tau(target, d, ids, s), 1)
    print(
        f"\nPart 2: held-out tau on {len(ids)} prompts x {a.eval_max_new} tokens, K=4 ({sim.num_steps} verification steps)"
    )
    print(f"{'dopd eval (engine)':34s} {sec_eng:9.1f}s  tau {eng.tau:.4f}")
    print(
        f"{'dopd eval --simulate (cached text)':34s} {sec_sim:9.1f}s  tau {sim.tau:.4f}   {sec_eng / sec_sim:.1f}x faster (first call, text not cached yet: {first:.1f}s)"
    )
    return {"prompts": len(ids), "max_new_tokens": a.eval_max_new, "steps": sim.num_steps, "engine_s": sec_eng, "simulate_s": sec_sim,
            "simulate_first_s": first, "ratio": sec_eng / sec_sim, "tau_engine": eng.tau, "tau_simulated": sim.tau}  # fmt: skip


if __name__ == "__main__":
    main()
