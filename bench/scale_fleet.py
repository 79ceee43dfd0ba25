"""Records/s, target tokens/s and learner steps/s of the whole Ray job at 1 / 2 / 4 / 8 / 16 rollout actors and
1 / 2 / 4 learner ranks, on this machine.

    python bench/scale_fleet.py [--target smollm2-135m] [--actors 1 2 4 8 16] [--learners 1 2 4] [--steps 8]
    python bench/scale_fleet.py --quick          # the tiny target, a short schedule (minutes on 2 cores)

Each row is one real `dopd train` job (dopd.train with the Ray runner and its embedded Ray, so the resource plan of
dopd/plan.py applies: Ray is told the real CPU count, every process gets max(1, cores // processes) torch threads
and, when oversubscribed, a share of the cores). Measured over the OPD phase, after the warm-up's first publish:
records trained / s, the actors' rollout tokens / s (the target's verification work, from the rollout rows) and
learner steps / s. A plan that does not fit memory is printed as refused, with the plan's numbers, and not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run_one(target: str, actors: int, learners: int, steps: int, new_tokens: int, out: Path) -> dict:
    from dopd.common.load import load_config
    from dopd.driver import RayFleet
    from dopd.plan import Machine, make_plan
    from dopd.train import train

    cfg = load_config(None, [
        "runner=ray", f"model.target={target}", "data.prompts=champ", "data.num_eval=4", "mode=opd",
        f"cluster.actors={actors}", f"cluster.learners={learners}", "sft.num_prompts=8", "sft.warmup_steps=1",
        f"sft.max_new_tokens={new_tokens}", f"rollout.max_new_tokens={new_tokens}", "rollout.batch_size=2",
        "learner.micro_batch_size=2", "learner.refresh_every=2", f"learner.steps={steps}", "learner.eval_every=100000",
        "learner.checkpoint_every=100000", "eval.num_prompts=2", f"eval.max_new_tokens={new_tokens}",
        "metrics.port=0", "cluster.object_store_memory=200000000", f"out_dir={out}",
    ])  # fmt: skip
    plan = make_plan(cfg, Machine.local())
    if not plan.fits:
        return {"refused": plan.refusal()}
    t0 = time.time()
    summary = train(cfg, RayFleet(cfg, log=lambda *a: None))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    opd = [r for r in rows if r.get("event") == "step" and r.get("phase") == "opd"]
    start = opd[0]["time"] - (opd[1]["time"] - opd[0]["time"]) if len(opd) > 1 else t0
    end = opd[-1]["time"]
    wall = max(end - start, 1e-9)
    roll = [r for r in rows if r.get("event") == "rollout" and start <= r["time"] <= end]
    return {
        "records_s": sum(r.get("records", 0) for r in opd) / wall,
        "tokens_s": sum(r.get("rollout_tokens", 0) for r in roll) / wall,
        "steps_s": len(opd) / wall,
        "total_s": time.time() - t0,
        "threads": plan.threads,
        "cpus": plan.actor_cpus,
        "trained_twice": summary["records_trained_twice"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--learners", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=8, help="OPD steps per job (after a 1-step SFT warm-up)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="the tiny target, 4 OPD steps, 16 new tokens")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(target="tiny-random-llama", steps=4, new_tokens=16))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(
        f"target {a.target}, {a.steps} OPD steps per job, {a.new_tokens} new tokens per rollout, micro-batch 2 per rank"
    )
    print(f"{'actors':>6} {'learners':>8} {'threads':>7} {'ray cpu':>7} {'records/s':>9} {'target tok/s':>12} "
          f"{'steps/s':>7} {'job s':>6}")  # fmt: skip
    rows = []
    for m in a.learners:
        for n in a.actors:
            with tempfile.TemporaryDirectory() as d:
                try:
                    r = run_one(a.target, n, m, a.steps, a.new_tokens, Path(d) / "run")
                except Exception as e:  # one failing point is a row, not the end of the table
                    r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append({"actors": n, "learners": m, **r})
            if "refused" in r or "error" in r:
                print(f"{n:>6} {m:>8}  {r.get('refused') or r.get('error')}")
                continue
            print(f"{n:>6} {m:>8} {r['threads']:>7} {r['cpus']:>7g} {r['records_s']:>9.2f} {r['tokens_s']:>12.1f} "
                  f"{r['steps_s']:>7.3f} {r['total_s']:>6.0f}")  # fmt: skip
            sys.stdout.flush()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end {load}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
