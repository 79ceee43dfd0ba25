"""The learner at speed: SFT and Draft-OPD step time with the drafter's forward in bf16 vs fp32, in one run.

    python bench/learner_step.py                    # SmolLM2-135M target, EAGLE-3 and DFlash drafters, CPU
    python bench/learner_step.py --kinds eagle3 --steps 20

Both learners train the same drafter (same seed) on the same data: the SFT records the target writes for
`--prompts` training prompts, then rollout records of the same policy. The bf16 learner runs the drafter's forward
under autocast (model.dtype=bfloat16: what `auto` picks on a CPU with AMX/AVX512-BF16), with fp32 master weights,
gradients and optimizer state; the fp32 learner is model.dtype=float32. Steps alternate between the two learners so
that a change in the machine's load hits both alike; the ratio is of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dopd.actors.actor import RolloutWorker
from dopd.common.load import load_config
from dopd.common.models import load_target
from dopd.learner.learner import Learner, TorchEngine
from dopd.prompts import run_prompts


def learner_for(cfg, target):
    t = target
    return Learner(
        cfg, 0, 1, t.info, t.model.config, t.embed_tokens.weight, t.lm_head.weight, "cpu", lambda m: TorchEngine(m, cfg)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--kinds", nargs="+", default=["eagle3", "dflash"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: EAGLE-3 only, 8 prompts, 4 steps")
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(kinds=["eagle3"], prompts=8, steps=4))
    if a.threads:
        torch.set_num_threads(a.threads)
    target = load_target(a.target, "cpu", "auto", quiet=True)
    rows = []
    for kind in a.kinds:
        base = [
            f"model.target={a.target}", f"drafter.kind={kind}", f"sft.num_prompts={a.prompts}", "sft.max_new_tokens=128",
            "rollout.max_new_tokens=128", f"learner.micro_batch_size={a.micro_batch}", "data.prompts=champ", "out_dir=/tmp/bench_learner",
        ] + ([f"drafter.draft_vocab_size={min(8192, target.info.vocab_size)}"] if kind == "eagle3" else ["drafter.num_layers=2"])  # fmt: skip
        cfgs = {dt: load_config(None, base + [f"model.dtype={dt}"]) for dt in ("float32", "bfloat16")}
        prompts = run_prompts(cfgs["bfloat16"], target.tokenizer)
        worker = RolloutWorker(cfgs["bfloat16"], 0, prompts.rollout, incarnation=0, target=target, log=print)
        teacher = worker.teacher_data(prompts.sft)
        learners = {dt: learner_for(c, target) for dt, c in cfgs.items()}
        for ln in learners.values():
            ln.set_teacher(teacher)
            ln.sft_step()  # warm-up: first-call allocations
        times = {("sft", dt): [] for dt in learners} | {("opd", dt): [] for dt in learners}
        for _ in range(a.steps):
            for dt, ln in learners.items():
                t0 = time.perf_counter()
                ln.sft_step()
                times[("sft", dt)].append(time.perf_counter() - t0)
        worker.set_weights(learners["float32"].gather_weights(), 1)
        records = [worker.produce(a.micro_batch)[0] for _ in range(a.steps + 1)]
        for ln in learners.values():
            ln.opd_step(records[0], 1)
        for batch in records[1:]:
            for dt, ln in learners.items():
                t0 = time.perf_counter()
                ln.opd_step(batch, 1)
                times[("opd", dt)].append(time.perf_counter() - t0)
        for phase in ("sft", "opd"):
            f32, b16 = statistics.median(times[(phase, "float32")]), statistics.median(times[(phase, "bfloat16")])
            rows.append(
                {
                    "kind": kind,
                    "phase": phase,
                    "fp32_s": f32,
                    "bf16_s": b16,
                    "bf16_over_fp32": b16 / f32,
                    "steps": a.steps,
                }
            )
    print(
        f"target {a.target}, {torch.get_num_threads()} threads, micro-batch {a.micro_batch} sequences of 128 answer tokens, median of {a.steps} alternating steps"
    )
    print(f"{'drafter':8s} {'step':5s} {'fp32 s':>8s} {'bf16 s':>8s} {'bf16/fp32':>9s}")
    for r in rows:
        print(f"{r['kind']:8s} {r['phase']:5s} {r['fp32_s']:8.3f} {r['bf16_s']:8.3f} {r['bf16_over_fp32']:9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
