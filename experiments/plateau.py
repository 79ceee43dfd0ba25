"""`dopd-experiments plateau`: does error-anchored on-policy distillation beat SFT on the same text, and by how much?

Design (issue "[2 of 6]"), top to bottom:
1. ONE shared SFT warm-up on target-written answers (`sft.num_prompts` prompts) to the preset's step budget; its
   held-out tau is compared with the preset's gate. A warm-up under the gate makes the run UNDERPOWERED (said in
   the summary): at low tau most positions are block starts, so error and random anchors train nearly the same
   states and a null would mean nothing.
2. Arms, each resumed from that checkpoint (drafter, optimizer, RNG), at the preset's `learner.opd_lr`, each taking the same number of optimizer
   steps on the same new prompts (`data.rollout_prompts=after_sft`, a pool of exactly steps x micro-batch prompts),
   in the same order for a given seed (seeds change the order). At T = 0 the rollout text is the target's greedy
   text whatever the drafter, generated once and cached on disk for every arm and seed. DFlash arms train a named
   recipe (common/recipes.py):
     A  SFT on the rollout text (DFlash: random anchors, as many supervised positions per sequence as B's accepted
        stream trained in the same seed's run, which runs first)
     B  official-2605                 G  official-tv (exact TV up to the first rejection)
     C  B with the paper's random anchors (`replay.anchors=shuffled`)
     D  B with lambda_rej = 0          H  B with the rejected stream on the first rejection only
     P  dopd's previous B (dopd-2511 with a reduced vocabulary and its own trained head: its own warm-up, as the
        shared one has the frozen full-vocabulary head; its curve starts from that warm-up)
     E  C with lambda_rej = 0          F  B with gamma = 1   (v2's ablations, run when asked for)
3. Evaluation: exact simulated greedy tau (`common/resegment.py`) on the preset's held-out prompts, per prompt,
   for paired statistics (`experiments/stats.py`): per arm the mean and SE over seeds, paired bootstrap contrasts B-A,
   G-A, B-C, G-B, B-H, B-D, B-P (and D-E, B-F when run; an effect counts beyond 3 SE of the difference), and the acceptance of a block started at
   every answer position (which an anchor-placement effect should move less than tau).
4. Reports: summary.json, results.csv (every evaluation), plot.png (tau against learner FLOPs and against training
   wall time), summary.md (`render_report`: the last two from the first two, so a committed run's reports re-render).
   Finished runs (their summary.json) are skipped on a rerun: the command is resumable.

Every run goes through the public API: `dopd.train.train` on an `InProcess` backend, each arm started from the
warm-up's checkpoint with `resume_from=`.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dopd.common.errors import DopdError
from dopd.common.load import load_config
from dopd.experiments.preset import Preset, choose
from dopd.experiments.stats import PerPrompt, arm_mean_se, contrast


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    overrides: tuple[str, ...]
    # DFlash: the named recipe the arm trains (common/recipes.py); other kinds keep their default loss
    recipe: str | None = None
    # a warm-up of its own (e.g. another head): these keys also change the warm-up, run once per distinct tuple
    warm: tuple[str, ...] = ()


_PREV_VOCAB = "drafter.draft_vocab_size={vocab}"  # dopd's previous B: a reduced vocabulary, its own trained head
ARMS: dict[str, Arm] = {
    "A": Arm(
        "sft",
        "SFT on the rollout text, as many supervised positions per step as B's accepted stream",
        ("loss.response=ttt", "loss.lambda_rej=0"),
    ),
    "B": Arm("opd", "Draft-OPD, official-2605 (69b03da)", (), "official-2605"),
    "G": Arm("opd_tv", "official-tv: exact TV up to the first rejection (e81a8bc)", (), "official-tv"),
    "C": Arm(
        "opd_random_anchors", "B, random anchors (paper's ablation)", ("replay.anchors=shuffled",), "official-2605"
    ),
    "D": Arm("opd_no_rejected", "B, lambda_rej = 0", ("loss.lambda_rej=0",), "official-2605"),
    "H": Arm(
        "opd_first_rejection",
        "B, rejected stream on the first rejection only",
        ("loss.rej_first_only=true",),
        "official-2605",
    ),
    "P": Arm(
        "opd_dopd2511",
        "dopd's previous B (dopd-2511: floored k3, trained head over a reduced vocabulary)",
        (),
        "dopd-2511",
        (_PREV_VOCAB,),
    ),
    "E": Arm(
        "random_anchors_no_rejected",
        "C, lambda_rej = 0",
        ("replay.anchors=shuffled", "loss.lambda_rej=0"),
        "official-2605",
    ),
    "F": Arm("opd_gamma1", "B, gamma = 1", ("loss.gamma=1.0",), "official-2605"),
}
DEFAULT_ARMS = ("A", "B", "G", "C", "D", "H", "P")  # E and F (the v2 ablations) run when asked for
# B-A, G-A: each recipe against matched SFT; B-C: anchors; G-B: the newer recipe; B-H, B-D: the rejected stream
CONTRASTS = (("B", "A"), ("G", "A"), ("B", "C"), ("G", "B"), ("B", "H"), ("B", "D"), ("B", "P"), ("D", "E"), ("B", "F"))
PRIMARY = ("A", "B", "G", "C")  # the arms that get `seeds` seeds; the others run seed 0
_PREV_VOCAB_SIZE = {"cpu": 8192, "gpu": 32000, "smoke": 200}


def arm_overrides(arm: str, drafter: str, preset: str) -> tuple[list[str], list[str]]:
    """(the arm's own overrides, the overrides its warm-up needs beyond the shared one) for this drafter kind."""
    a = ARMS[arm]
    if drafter != "dflash" and arm in ("G", "H", "P"):
        raise DopdError(f"arm {arm} is a DFlash recipe: run it with --drafter dflash")
    warm = [w.format(vocab=_PREV_VOCAB_SIZE[preset]) for w in a.warm]
    own = ([f"loss.recipe={a.recipe}"] if a.recipe and drafter == "dflash" else []) + list(a.overrides)
    return own + warm, warm


_DRAFTERS_CPU = {
    "dflash": ["drafter.kind=dflash", "rollout.block_size=8"],
    "eagle3": ["drafter.kind=eagle3", "rollout.block_size=4", "drafter.draft_vocab_size=8192"],
}
PRESETS: dict[str, Preset] = {
    # SmolLM2-135M (bf16 on an AMX CPU) on 2 cores (docs/plateau/README.md: the measured time, the depth pilot).
    # The arms peak at the warm-up's final rate (opd_lr = lr x min_lr_ratio): restarting at lr itself cost every arm,
    # SFT included, held-out tau within its 32 steps (docs/plateau/v3/)
    "cpu": Preset(
        overrides=[
            "data.prompts=champ",
            "data.num_eval=64",
            "data.max_prompt_tokens=384",
            "sft.num_prompts=640",
            "sft.max_new_tokens=128",
            "rollout.max_new_tokens=128",
            "rollout.batch_size=8",
            "learner.micro_batch_size=4",
            "learner.refresh_every=2",
            "learner.lr=1e-3",
            "learner.warmup_steps=10",
            "learner.opd_lr=1e-4",
            "eval.num_prompts=64",
            "eval.max_new_tokens=512",
            "learner.checkpoint_every=1000000",
        ],  # fmt: skip
        warmup_steps=1000,
        gate=2.5,
        arm_steps=32,
        evals=1,
        seeds=2,
        drafters=_DRAFTERS_CPU,
    ),
    # an H100/H200: bf16, longer blocks, more of everything
    "gpu": Preset(
        overrides=[
            "data.prompts=champ",
            "data.num_eval=64",
            "data.max_prompt_tokens=512",
            "sft.num_prompts=4096",
            "sft.max_new_tokens=256",
            "rollout.max_new_tokens=256",
            "rollout.batch_size=32",
            "learner.micro_batch_size=16",
            "learner.refresh_every=2",
            "learner.lr=5e-4",
            "learner.warmup_steps=50",
            "learner.opd_lr=5e-5",
            "eval.num_prompts=64",
            "eval.max_new_tokens=512",
            "model.device=cuda",
            "model.dtype=bfloat16",
            "learner.checkpoint_every=1000000",
        ],  # fmt: skip
        warmup_steps=3000,
        gate=3.5,
        arm_steps=200,
        evals=4,
        seeds=3,
        drafters={
            "dflash": ["drafter.kind=dflash", "rollout.block_size=16"],
            "eagle3": ["drafter.kind=eagle3", "rollout.block_size=7"],
        },
    ),
    # seconds on the tiny random target: every arm, seed and report (tests)
    "smoke": Preset(
        overrides=[
            "model.target=tiny-random-llama",
            "data.prompts=champ-problems",
            "data.num_eval=6",
            "sft.num_prompts=16",
            "sft.max_new_tokens=16",
            "rollout.max_new_tokens=16",
            "rollout.batch_size=4",
            "learner.micro_batch_size=2",
            "learner.refresh_every=2",
            "learner.lr=3e-3",
            "eval.num_prompts=6",
            "eval.max_new_tokens=24",
            "learner.checkpoint_every=1000000",
        ],  # fmt: skip
        warmup_steps=6,
        gate=1.5,
        arm_steps=4,
        evals=2,
        seeds=2,
        drafters={
            "dflash": ["drafter.kind=dflash", "rollout.block_size=4"],
            "eagle3": ["drafter.kind=eagle3", "rollout.block_size=3", "drafter.draft_vocab_size=200"],
        },
    ),
}


def _rows(path: Path, event: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in open(path)) if r["event"] == event]


def _per_prompt(row: dict) -> PerPrompt:
    return PerPrompt(row["per_prompt_steps"], row["per_prompt_accepted"])


def plan(arms: tuple[str, ...], seeds: int) -> list[tuple[str, int]]:
    """Run order: seed 0 of every arm first (a partial run already answers the main question), then more seeds."""
    order = [(a, 0) for a in ("B", "A", "G", "C", "D", "H", "P", "E", "F") if a in arms]
    order += [(a, s) for s in range(1, seeds) for a in ("B", "A", "G", "C") if a in arms]
    return order


def plateau(
    out: Path, preset: str, extra: list[str], arms: tuple[str, ...] = DEFAULT_ARMS, seeds: int | None = None,
    drafter: str = "dflash", report: Path | None = None, log=print,
) -> dict:  # fmt: skip
    from dopd.common.models import load_target
    from dopd.local import InProcess
    from dopd.train import train

    P = choose(PRESETS, preset)
    if drafter not in P.drafters:
        raise DopdError(f"unknown drafter '{drafter}' for the plateau experiment (known: {', '.join(P.drafters)})")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise DopdError(f"unknown arms {bad} (known: {', '.join(ARMS)})")
    seeds = P.seeds if seeds is None else seeds
    if seeds < 1:
        raise DopdError(f"--seeds must be >= 1 (got {seeds})")
    out.mkdir(parents=True, exist_ok=True)
    t_call = time.time()
    W, N = P.warmup_for(drafter), P.arm_steps
    base = P.overrides + P.drafters[drafter] + list(extra)
    cfg0 = load_config(None, base + ["mode=sft"])  # the settings every run shares, read as the warm-up's (no OPD phase)
    n_sft = cfg0.sft.num_prompts
    pool = N * cfg0.learner.micro_batch_size  # exactly the prompts one arm trains on; seed s takes the s-th such sample
    base += [f"data.num_train={n_sft + seeds * pool}", "data.rollout_prompts=after_sft"]
    command = " ".join(
        ["dopd-experiments plateau", f"--out {out}", f"--preset {preset}", f"--drafter {drafter}"]
        + ([f"--seeds {seeds}"] if seeds != P.seeds else [])
        + ([f"--arms {','.join(arms)}"] if set(arms) != set(DEFAULT_ARMS) else [])
        + list(extra)
    )

    # 1. the shared warm-up, its held-out evaluation and the gate (an arm that needs another head gets its own)
    target = None
    warmups: dict[tuple[str, ...], tuple[Path, dict, dict]] = {}

    def warmup(extra_warm: tuple[str, ...]) -> tuple[Path, list[dict], dict]:
        nonlocal target
        if extra_warm in warmups:
            return warmups[extra_warm]
        wdir = out / (
            "warmup" if not extra_warm else "warmup_" + "_".join(x.split(".")[-1].replace("=", "") for x in extra_warm)
        )
        curve = sorted({W >> k for k in range(1, 5)} - {0})  # the SFT curve: held-out tau at W/16, W/8, W/4, W/2, W
        wcfg = load_config(
            None,
            base
            + list(extra_warm)
            + [
                "mode=sft",
                f"sft.warmup_steps={W}",
                f"learner.steps={W}",
                f"learner.eval_every={10**9}",
                f"learner.eval_at={curve}",
                f"out_dir={wdir}",
            ],
        )
        if target is None:
            target = load_target(wcfg.model.target, wcfg.model.device, wcfg.model.dtype, forward=wcfg.model.forward)
        if not (wdir / "summary.json").is_file():
            log(
                f"== warm-up{' (' + ', '.join(extra_warm) + ')' if extra_warm else ''}: {W} SFT steps on the target's answers to {n_sft} prompts"
            )
            train(wcfg, InProcess(wcfg, target=target, log=log))
        wsum = json.loads((wdir / "summary.json").read_text())
        warmups[extra_warm] = (
            wdir / "checkpoints" / f"step_{W:07d}",
            _rows(wdir / "metrics.jsonl", "eval"),
            wsum["time"],
        )
        return warmups[extra_warm]

    _, warm_evals, warm_state = warmup(())
    warm = warm_evals[-1]  # the warm-up's own final evaluation (its drafter, at step W)
    sft_curve = [{k: e[k] for k in ("step", "flops", "tau", "steps", "position_accepted")} for e in warm_evals]
    gate = {"tau": warm["tau"], "required": P.gate, "met": bool(warm["tau"] >= P.gate)}
    log(
        f"== warm-up held-out tau {warm['tau']:.3f} on {warm['steps']} verification steps (gate {P.gate}: {'met' if gate['met'] else 'NOT met'})"
    )
    K = cfg0.rollout.block_size

    # 2. the arms
    runs: dict[tuple[str, int], dict] = {}
    for arm, seed in plan(arms, seeds):
        rdir = out / "arms" / f"{arm}_{ARMS[arm].name}_s{seed}"
        own, extra_warm = arm_overrides(arm, drafter, preset)
        a_ckpt, a_evals, a_state = warmup(tuple(extra_warm))
        ov = base + own + [
            "mode=opd", f"seed={seed}", f"data.num_train={n_sft + (seed + 1) * pool}", f"data.rollout_skip={seed * pool}", f"sft.warmup_steps={W}", f"learner.steps={N}",
            f"learner.eval_every={max(1, N // P.evals)}", f"out_dir={rdir}", f"resume_from={a_ckpt}",
        ]  # fmt: skip
        if arm == "A" and drafter == "dflash":
            # as many supervised positions per sequence as B's accepted stream trained (B of this seed, run first;
            # without it, one block per verification step of the warm-up drafter on a rollout-length answer)
            b = runs.get(("B", seed)) or runs.get(("B", 0))
            per_seq = (
                sum(r["n_acc"] for r in b["steps"])
                / max(1, sum(r.get("records", cfg0.learner.micro_batch_size) for r in b["steps"]))
                if b
                else None
            )
            blocks = round(per_seq / K) if per_seq else round(cfg0.rollout.max_new_tokens / warm["tau"])
            ov.append(f"loss.dflash_anchors_per_seq={max(1, blocks)}")
        cfg = load_config(None, ov)
        if not (rdir / "summary.json").is_file():
            log(f"== arm {arm} ({ARMS[arm].what}), seed {seed}: {N} steps")
            train(cfg, InProcess(cfg, target=target, log=log))
        evals = _rows(rdir / "metrics.jsonl", "eval")
        steps = _rows(rdir / "metrics.jsonl", "step")
        # where the arm started: its FLOPs, time and tau are counted from its own warm-up (P has another head)
        start = {
            "flops": a_evals[-1]["flops"],
            "tau": a_evals[-1]["tau"],
            "steps": a_evals[-1]["steps"],
            "state": a_state,
            "overrides": list(extra_warm),
        }
        runs[(arm, seed)] = {
            "evals": evals,
            "steps": steps,
            "summary": json.loads((rdir / "summary.json").read_text()),
            "start": start,
        }

    # 3. statistics and reports
    summary = _summarize(
        P, preset, drafter, cfg0, warm, gate, runs, warm_state, seeds, command, time.time() - t_call, sft_curve
    )
    for d in {out} | ({report} if report else set()):
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps(summary, indent=1))
        _csv(d / "results.csv", warm, runs, sft_curve)
        render_report(d)
    return summary


def render_report(d: Path) -> None:
    """summary.md and plot.png from a report directory's summary.json and results.csv (what a run writes, and what
    docs/plateau keeps: a committed run's reports re-render from them)."""
    s = json.loads((d / "summary.json").read_text())
    (d / "summary.md").write_text(_markdown(s))
    _plot(d / "plot.png", list(csv.DictReader(open(d / "results.csv"))), s)


def _train_s(e: dict, warm_state: dict) -> float:
    return e["train_s"] - (warm_state["rollout_s"] + warm_state["replay_s"] + warm_state["learner_s"])


def sft_plateau(curve: list[dict]) -> dict:
    """Where the SFT curve flattens: held-out tau gained per doubling of learner FLOPs between its evaluations
    (the curve's points are log-spaced in steps, so each is about one doubling), and the last doubling's gain."""
    pts = [c for c in curve if c["flops"] > 0]
    gains = [
        {
            "from_step": a["step"],
            "to_step": b["step"],
            "doublings": math.log2(b["flops"] / a["flops"]),
            "tau_gain": b["tau"] - a["tau"],
        }
        for a, b in zip(pts, pts[1:])
    ]
    for g in gains:
        g["tau_gain_per_doubling"] = g["tau_gain"] / g["doublings"] if g["doublings"] > 0 else float("nan")
    return {"gains": gains, "last_gain_per_doubling": gains[-1]["tau_gain_per_doubling"] if gains else None}


def _summarize(
    P: Preset, preset, drafter, cfg0, warm, gate, runs, warm_state, seeds, command, wall, sft_curve=()
) -> dict:
    final: dict[str, list[PerPrompt]] = {}
    final_rows: dict[str, list[dict]] = {}
    for (arm, _seed), r in sorted(runs.items()):
        final.setdefault(arm, []).append(_per_prompt(r["evals"][-1]))
        final_rows.setdefault(arm, []).append(r["evals"][-1])
    tau_final, tau_se = {}, {}
    for arm, pp in final.items():
        tau_final[arm], tau_se[arm] = arm_mean_se(pp)
    contrasts = {f"{x}-{y}": contrast(final[x], final[y]) for x, y in CONTRASTS if x in final and y in final}
    warm_pp = _per_prompt(warm)
    per_arm = {}
    for arm in final:
        rs = [r for (a, _), r in sorted(runs.items()) if a == arm]
        per_arm[arm] = {
            "what": ARMS[arm].what, "overrides": list(arm_overrides(arm, drafter, preset)[0]), "seeds": len(rs),
            "tau_per_seed": [r["evals"][-1]["tau"] for r in rs],
            "position_accepted": sum(e["position_accepted"] for e in final_rows[arm]) / len(rs),
            "alpha1": sum(e["alpha"][0] for e in final_rows[arm]) / len(rs),
            "learner_flops": sum(r["summary"]["flops"] - r["start"]["flops"] for r in rs) / len(rs),
            "train_s": sum(_train_s(r["evals"][-1], r["start"]["state"]) for r in rs) / len(rs),
            "n_acc_per_step": sum(sum(s["n_acc"] for s in r["steps"]) / max(1, len(r["steps"])) for r in rs) / len(rs),
            "n_rej_per_step": sum(sum(s["n_rej"] for s in r["steps"]) / max(1, len(r["steps"])) for r in rs) / len(rs),
            "diagnostics": _diagnostics([s for r in rs for s in r["steps"]]),
        }  # fmt: skip
        if rs[0]["start"]["overrides"]:  # its own warm-up: the start its change is measured from (not the shared one's)
            per_arm[arm]["own_warmup"] = {k: rs[0]["start"][k] for k in ("overrides", "tau", "steps", "flops")}
    powered = gate["met"]
    return {
        "preset": preset, "drafter": drafter, "block_size": cfg0.rollout.block_size, "target": cfg0.model.target,
        "gate": gate, "powered": powered,
        "eval_steps": warm["steps"], "eval_prompts": len(warm["per_prompt_steps"]), "eval_max_new_tokens": cfg0.eval.max_new_tokens,
        "seeds": {arm: v["seeds"] for arm, v in per_arm.items()}, "seeds_requested": seeds,
        "tau_warmup": warm["tau"], "tau_warmup_position_accepted": warm["position_accepted"],
        "tau_warmup_se_prompts": arm_mean_se([warm_pp])[1],
        "sft_curve": list(sft_curve), "sft_plateau": sft_plateau(list(sft_curve)),
        "tau_final": tau_final, "tau_se": tau_se,
        "tau_se_kind": "SE over seeds (>= 2 seeds); bootstrap over prompts for single-seed arms",
        "contrasts": contrasts, "significance": "|diff| > 3 SE of the difference (SE = sqrt(se_prompts^2 + se_seeds^2))",
        "arms": per_arm, "warmup_steps": P.warmup_steps, "arm_steps": P.arm_steps,
        "micro_batch_size": cfg0.learner.micro_batch_size, "command": command, "wall_s_this_call": wall,
        "wall_s_recorded": _wall_recorded(runs, warm_state),
    }  # fmt: skip


DIAGNOSTICS = (
    "acc_silenced",
    "rej_silenced",
    "replay_kl_matched",
    "replay_kl_accepted",
    "replay_kl_first_rejected",
    "replay_kl_post_rejection",
    "grad_norm_head",
    "grad_norm_body",
)


def _diagnostics(steps: list[dict]) -> dict:
    """The learner's per-step diagnostics (learner/diagnostics.py), averaged over an arm's steps (and seeds): the
    share of each stream's positions a clip silences, the replay-mismatch KL split, the gradient norms."""
    out = {}
    for k in DIAGNOSTICS:
        xs = [float(s[k]) for s in steps if s.get(k) is not None]
        if xs:
            out[k] = sum(xs) / len(xs)
    return out


def _wall_recorded(runs, warm_state) -> dict:
    """Seconds spent per phase as the runs' own counters recorded them (rollout/replay/learner/eval): every warm-up
    once (the shared one and any arm's own), each arm from its own warm-up's counters."""
    phases = ("rollout_s", "replay_s", "learner_s", "eval_s")
    own = {tuple(r["start"]["overrides"]): r["start"]["state"] for r in runs.values() if r["start"]["overrides"]}
    w = sum(st[k] for st in [warm_state, *own.values()] for k in phases)
    arms = 0.0
    for r in runs.values():
        st = r["summary"]["time"]
        arms += sum(st[k] - r["start"]["state"][k] for k in phases)
    return {"warmup": w, "arms": arms, "total": w + arms}


def _csv(path: Path, warm, runs, sft_curve=()) -> None:
    head = (
        "arm",
        "seed",
        "step",
        "arm_step",
        "learner_flops_after_warmup",
        "train_s_after_warmup",
        "tau",
        "alpha1",
        "position_accepted",
        "eval_steps",
    )
    rows = [
        head,
        (
            "warmup",
            0,
            warm["step"],
            0,
            0.0,
            0.0,
            warm["tau"],
            warm["alpha"][0],
            warm["position_accepted"],
            warm["steps"],
        ),
    ]
    # the SFT curve (the warm-up's own evaluations): learner FLOPs counted from step 0, arm_step = steps before the end
    rows += [
        (
            "sft_curve",
            0,
            c["step"],
            c["step"] - warm["step"],
            c["flops"],
            "",
            c["tau"],
            "",
            c["position_accepted"],
            c["steps"],
        )
        for c in sft_curve
    ]
    for (arm, seed), r in sorted(runs.items()):
        st = r["start"]
        if st[
            "overrides"
        ]:  # an arm with its own warm-up: its start is its first row (arm_step 0), not the shared warm-up
            rows.append((arm, seed, warm["step"], 0, 0.0, 0.0, st["tau"], "", "", st["steps"]))
        for e in r["evals"]:
            rows.append(
                (
                    arm,
                    seed,
                    e["step"],
                    e["step"] - warm["step"],
                    e["flops"] - st["flops"],
                    _train_s(e, st["state"]),
                    e["tau"],
                    e["alpha"][0],
                    e["position_accepted"],
                    e["steps"],
                )
            )
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _plot(path: Path, rows: list[dict], s: dict) -> None:
    """tau against learner FLOPs and against training time after the warm-up, one curve per arm and seed (the rows
    of results.csv)."""
    try:
        import matplotlib
    except ImportError:
        raise DopdError("the plateau experiment's plot needs matplotlib: pip install 'dopd[experiments]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [r for r in rows if r["arm"] == "sft_curve" and float(r["learner_flops_after_warmup"]) > 0]
    fig, axes = plt.subplots(1, 3 if sft else 2, figsize=(18 if sft else 12, 4.5), sharey=not sft)
    colors = dict(
        zip(
            ARMS,
            (
                "tab:blue",
                "tab:red",
                "tab:cyan",
                "tab:green",
                "tab:orange",
                "tab:pink",
                "tab:gray",
                "tab:olive",
                "tab:purple",
            ),
        )
    )
    warm = next(r for r in rows if r["arm"] == "warmup")
    curves: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["arm"] not in ("warmup", "sft_curve"):
            curves.setdefault((r["arm"], int(r["seed"])), []).append(r)
    seen = set()
    for (arm, seed), evals in sorted(curves.items()):
        if evals[0]["arm_step"] != "0":  # the arm started from the shared warm-up (else its first row is its own start)
            evals = [{"learner_flops_after_warmup": 0.0, "train_s_after_warmup": 0.0, "tau": warm["tau"]}, *evals]
        xs_f = [float(e["learner_flops_after_warmup"]) for e in evals]
        xs_t = [float(e["train_s_after_warmup"]) for e in evals]
        ys = [float(e["tau"]) for e in evals]
        label = None if arm in seen else f"{arm}: {ARMS[arm].what}"
        seen.add(arm)
        style = "-" if seed == 0 else ":"
        axes[0].plot(xs_f, ys, style, marker="o", ms=3, color=colors[arm], label=label)
        axes[1].plot(xs_t, ys, style, marker="o", ms=3, color=colors[arm])
    axes[0].set_xlabel("learner FLOPs after the arm's warm-up")
    axes[1].set_xlabel("training wall time after the arm's warm-up, s (rollout + scoring + learner)")
    axes[0].set_ylabel(f"held-out tau ({s['eval_prompts']} prompts x {s['eval_max_new_tokens']} tokens)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if sft:  # the SFT curve to its plateau: the shared warm-up's own evaluations, FLOPs from step 0 on a log axis
        ax = axes[2]
        ax.plot(
            [float(r["learner_flops_after_warmup"]) for r in sft], [float(r["tau"]) for r in sft], "-o", color="black"
        )
        for r in sft:
            ax.annotate(
                f"step {r['step']}",
                (float(r["learner_flops_after_warmup"]), float(r["tau"])),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -10),
            )
        ax.axhline(s["gate"]["required"], ls="--", color="gray", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("learner FLOPs of the SFT warm-up (log)")
        ax.set_ylabel("held-out tau")
        ax.set_title(f"SFT curve (dashed: gate {s['gate']['required']})", fontsize=9)
    gate = "gate met" if s["gate"]["met"] else f"gate {s['gate']['required']} NOT met: underpowered"
    fig.suptitle(
        f"{s['drafter']} K={s['block_size']} on {s['target']} ({s['preset']} preset; warm-up tau {s['tau_warmup']:.3f}, {gate}); dotted = seed >= 1"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(s: dict) -> str:
    g = s["gate"]
    lines = [
        "# Plateau experiment: summary", "", f"Command: `{s['command']}`", "",
        f"{s['drafter']} drafter, K = {s['block_size']}, target {s['target']}. Held-out: {s['eval_prompts']} prompts x "
        f"{s['eval_max_new_tokens']} tokens, exact simulated greedy tau ({s['eval_steps']} verification steps at the warm-up).",
        f"Warm-up: {s['warmup_steps']} SFT steps, held-out tau {s['tau_warmup']:.3f} (gate {g['required']}: "
        f"{'met' if g['met'] else 'NOT met, so the run is underpowered'}). Each arm: {s['arm_steps']} steps x "
        f"{s['micro_batch_size']} new prompts.", "",
        "| arm | what | seeds | final tau (mean) | SE | accepted drafts per position (all positions) | accepted-stream weight / rejected positions per step |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for arm, v in s["arms"].items():
        lines.append(
            f"| {arm} | {v['what']} | {v['seeds']} | {s['tau_final'][arm]:.4f} | {s['tau_se'][arm]:.4f} | {v['position_accepted']:.4f} | {v['n_acc_per_step']:.0f} / {v['n_rej_per_step']:.0f} |"
        )
    for arm, v in s["arms"].items():
        if v.get("own_warmup"):  # its tau moved from its own start, not from the shared warm-up's
            w = v["own_warmup"]
            lines.append(
                f"\n{arm} starts from its own warm-up ({', '.join(w['overrides'])}; otherwise the shared one's steps and prompts): held-out tau {w['tau']:.4f} ({w['steps']} verification steps), so the arm moved tau by {s['tau_final'][arm] - w['tau']:+.4f}."
            )
    diag = {arm: v["diagnostics"] for arm, v in s["arms"].items() if v.get("diagnostics")}
    if diag:  # learner diagnostics, mean over the arm's steps (a blank: the arm's loss has no such stream)
        lines += ["", "Learner diagnostics (mean over steps): the share of each stream's positions a clip silences, the replay-mismatch KL(q || p) by position group, gradient norms:", "",
                  "| arm | " + " | ".join(DIAGNOSTICS) + " |", "|---|" + "---|" * len(DIAGNOSTICS)]  # fmt: skip
        for arm, d in diag.items():
            lines.append(f"| {arm} | " + " | ".join(f"{d[k]:.4g}" if k in d else "" for k in DIAGNOSTICS) + " |")
    if s.get("sft_curve"):  # the warm-up's own evaluations: the SFT curve and the tau it gained per doubling of FLOPs
        gain = {g["to_step"]: g["tau_gain_per_doubling"] for g in s["sft_plateau"]["gains"]}
        lines += [
            "",
            "SFT curve (the shared warm-up's held-out evaluations):",
            "",
            "| step | learner FLOPs | tau | verification steps | tau gained per doubling of FLOPs since the previous point |",
            "|---|---|---|---|---|",
        ]
        for c in s["sft_curve"]:
            g = f"{gain[c['step']]:+.4f}" if c["step"] in gain else ""
            lines.append(f"| {c['step']} | {c['flops']:.3g} | {c['tau']:.4f} | {c['steps']} | {g} |")
    lines += ["", "| contrast | diff | SE (prompts, seeds) | 95% CI | counts (> 3 SE) |", "|---|---|---|---|---|"]
    for k, c in s["contrasts"].items():
        seeds = "n/a (1 seed)" if c["se_seeds"] is None else f"{c['se_seeds']:.4f}"
        lines.append(
            f"| {k} | {c['diff']:+.4f} | {c['se']:.4f} ({c['se_prompts']:.4f}, {seeds}) | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {'yes' if c['significant'] else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


def main_plateau(out: Path, preset: str, extra: list[str], arms, seeds, drafter, report) -> dict:
    return plateau(out, preset, extra, arms, seeds, drafter, report, log=lambda m: print(m, file=sys.stderr))
