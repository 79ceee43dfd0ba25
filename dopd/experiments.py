"""`dopd experiment plateau`: does Draft-OPD keep improving where continued SFT plateaus, at equal learner FLOPs?

From ONE shared SFT warm-up checkpoint (drafter, optimizer, data cursors, RNG) five arms continue until each has
spent the same learner FLOPs (counted by PyTorch's FlopCounterMode; rollout, replay and evaluation are not
learner FLOPs):
  (a) sft               continued SFT on target-regenerated answers
  (b) sft_on_opd_data   SFT on exactly the sequences arm (c)'s rollouts collected (controls for fresh data)
  (c) opd               Draft-OPD: rollout + error-position replay + acceptance-aware distillation
  (d) opd_random_anchors  as (c), replaying from as many random answer positions as there were errors
  (e) opd_gamma1        as (c), no position decay on the rejected stream (gamma = 1)
Every arm's held-out tau is measured on the same prompts with the same settings. Outputs: results.csv, plot.png
(tau vs learner FLOPs), summary.md and summary.json.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

from dopd.common.config import load_config
from dopd.common.models import load_target

ARMS = ("sft", "sft_on_opd_data", "opd", "opd_random_anchors", "opd_gamma1")

PRESETS: dict[str, dict] = {
    # about 1.5 h on 2 CPU cores (SmolLM2-135M fp32); the SFT data is generated once and cached
    "cpu": {
        "overrides": [
            "data.prompts=champ", "data.num_eval=16", "data.max_prompt_tokens=384", "sft.num_prompts=384",
            "sft.max_new_tokens=128", "rollout.max_new_tokens=128", "rollout.batch_size=8", "rollout.block_size=4",
            "drafter.kind=eagle3", "drafter.draft_vocab_size=8192", "learner.micro_batch_size=4",
            "learner.refresh_every=4", "learner.lr=1e-3", "learner.warmup_steps=10", "eval.num_prompts=16",
            "eval.max_new_tokens=128", "learner.checkpoint_every=1000000",
        ],  # the rejected stream is top-k forward KL (the default; see LossConfig.rej_divergence)
        "warmup_steps": 200,  # about two epochs of the 384 target-written answers: SFT is near its plateau
        "budget_steps": 60,  # the FLOP budget = this many warm-up-sized SFT steps
        "evals": 4,
    },
    # seconds on the tiny random target: exercises every arm and report (tests)
    "smoke": {
        "overrides": [
            "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "sft.num_prompts=32",
            "sft.max_new_tokens=24", "rollout.max_new_tokens=24", "rollout.batch_size=4", "rollout.block_size=3",
            "learner.micro_batch_size=2", "learner.refresh_every=2", "learner.lr=3e-3", "eval.num_prompts=4",
            "eval.max_new_tokens=16", "learner.checkpoint_every=1000000", "drafter.draft_vocab_size=200",
        ],
        "warmup_steps": 6,
        "budget_steps": 4,
        "evals": 2,
    },
    # a GPU machine: full vocabulary head, more data, longer answers
    "gpu": {
        "overrides": [
            "data.prompts=champ", "data.num_eval=32", "data.max_prompt_tokens=512", "sft.num_prompts=2048",
            "sft.max_new_tokens=256", "rollout.max_new_tokens=256", "rollout.batch_size=32", "rollout.block_size=4",
            "drafter.kind=eagle3", "learner.micro_batch_size=8", "learner.refresh_every=4", "learner.lr=5e-4",
            "learner.warmup_steps=20", "eval.num_prompts=32", "eval.max_new_tokens=128", "model.device=cuda",
            "model.dtype=bfloat16", "learner.checkpoint_every=1000000",
        ],
        "warmup_steps": 600,
        "budget_steps": 400,
        "evals": 8,
    },
}

ARM_OVERRIDES = {
    "sft": ["mode=sft"],
    "sft_on_opd_data": ["mode=sft"],  # + sft.sequences=<opd arm's sequences>
    "opd": ["mode=opd"],
    "opd_random_anchors": ["mode=opd", "loss.response=blocks", "replay.anchors=shuffled"],
    "opd_gamma1": ["mode=opd", "loss.gamma=1.0"],
}


def _rows(path: Path, event: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in open(path)) if r["event"] == event]


def plateau(out: Path, preset: str, extra: list[str], arms: tuple[str, ...] = ARMS, log=print) -> dict:
    from dopd.local import Trainer

    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    P = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["dopd", "experiment", "plateau", "--out", str(out), "--preset", preset] + ([] if set(arms) == set(ARMS) else ["--arms", ",".join(arms)]) + list(extra))
    base = P["overrides"] + list(extra)
    t_start = time.time()

    # 1. the shared warm-up
    W = P["warmup_steps"]
    wcfg = load_config(None, base + ["mode=sft", f"learner.steps={W}", f"learner.eval_every={W}", f"out_dir={out / 'warmup'}"])
    target = load_target(wcfg.model.target, wcfg.model.device, wcfg.model.dtype)
    warm_ckpt = out / "warmup" / "checkpoints" / f"step_{W:07d}"
    if not warm_ckpt.is_dir():
        log(f"== warm-up: {W} SFT steps")
        Trainer(wcfg, target=target, log=log).run()
    warm_rows = _rows(out / "warmup" / "metrics.jsonl", "step")
    warm_flops = warm_rows[-1]["flops"]
    budget = P["budget_steps"] * warm_flops / len(warm_rows)
    tau_warm = _warmup_tau(out, wcfg, target)
    eval_every = max(1, P["budget_steps"] // P["evals"])
    log(f"== warm-up tau {tau_warm:.3f}; learner FLOP budget per arm {budget:.3g}")

    # 2. the arms, each resumed from the same checkpoint
    results: dict[str, dict] = {}
    order = [a for a in ("sft", "opd", "sft_on_opd_data", "opd_random_anchors", "opd_gamma1") if a in arms]
    for arm in order:
        adir = out / arm
        ov = base + ARM_OVERRIDES[arm] + [
            f"sft.warmup_steps={W}", f"learner.steps={10**6}", f"learner.flops_budget={warm_flops + budget}",
            f"learner.eval_every={eval_every}", f"out_dir={adir}",
        ]  # fmt: skip
        if arm == "sft_on_opd_data":
            ov.append(f"sft.sequences={out / 'opd' / 'opd_sequences.jsonl'}")
        cfg = load_config(None, ov)
        if not (adir / "summary.json").is_file():
            log(f"== arm {arm}")
            if adir.exists():
                shutil.rmtree(adir)
            (adir / "checkpoints").mkdir(parents=True)
            shutil.copytree(warm_ckpt, adir / "checkpoints" / warm_ckpt.name)
            (adir / "checkpoints" / "latest").write_text(warm_ckpt.name)
            tr = Trainer(cfg, target=target, resume=True, log=log)
            if arm == "sft_on_opd_data":  # new data: start its epoch at the beginning
                tr.state.sft_cursor = tr.state.sft_epoch = 0
            tr.run()
        summ = json.loads((adir / "summary.json").read_text())
        evals = _rows(adir / "metrics.jsonl", "eval")
        results[arm] = {"summary": summ, "evals": evals}

    # 3. reports
    rows = [("arm", "step", "learner_flops_after_warmup", "tau")]
    rows.append(("warmup", W, 0.0, tau_warm))
    for arm, r in results.items():
        for e in r["evals"]:
            rows.append((arm, e["step"], e["flops"] - warm_flops, e["tau"]))
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    _plot(out / "plot.png", results, warm_flops, tau_warm, target.info.name)
    # an arm's state counters continue the warm-up's: subtract them so the phases are the arm's own
    warm_state = json.loads((out / "warmup" / "summary.json").read_text()).get("state", {})
    phases = ("rollout_s", "replay_s", "learner_s", "eval_s")

    def own(arm: str, key: str) -> float:
        return results[arm]["summary"].get("state", {}).get(key, 0.0) - warm_state.get(key, 0.0)

    opd_state = {k: own("opd", k) for k in (*phases, "rollout_tokens", "replay_anchors")} if "opd" in results else {}
    phase_s = {k: opd_state.get(k, 0.0) for k in phases}
    total_s = sum(phase_s.values()) or 1.0
    drafter_dir = out / "warmup" / "drafter"
    from dopd.common.drafters import Drafter

    spec = Drafter.read_spec(drafter_dir)
    cfg0 = load_config(None, base)
    tau_final = {arm: r["evals"][-1]["tau"] for arm, r in results.items()}
    summary = {
        "tau_final": tau_final,
        "tau_warmup": tau_warm,
        "learner_flops": budget,
        "learner_flops_per_arm": {arm: r["summary"]["flops"] - warm_flops for arm, r in results.items()},
        "target": cfg0.model.target,
        "drafter": spec.kind,
        "drafter_params": _params(drafter_dir),
        "draft_vocab_size": spec.draft_vocab_size,
        "block_size": cfg0.rollout.block_size,
        "eval_prompts": json.loads((out / "warmup" / "split.json").read_text())["eval_ids"][: cfg0.eval.num_prompts],
        "eval_max_new_tokens": cfg0.eval.max_new_tokens,
        "warmup_steps": W,
        "command": command,
        "preset": preset,
        "wall_s_this_call": time.time() - t_start,  # arms finished by an earlier call are not re-run
        "arm_time_s": {arm: sum(own(arm, k) for k in phases) for arm in results},
        # every OPD arm's own rollout speed: an arm run while the CPU was shared shows it here
        "arm_rollout_tokens_per_s": {arm: own(arm, "rollout_tokens") / own(arm, "rollout_s") for arm in results if own(arm, "rollout_s") > 0},
        "opd_rollout_tokens_per_s": opd_state.get("rollout_tokens", 0) / max(phase_s["rollout_s"], 1e-9),
        "opd_replay_anchors_per_s": opd_state.get("replay_anchors", 0) / max(phase_s["replay_s"], 1e-9),
        "opd_time_share": {k.replace("_s", ""): v / total_s for k, v in phase_s.items()},
        "opd_time_s": phase_s,
    }
    if "opd" in tau_final and "sft" in tau_final:
        summary["opd_over_sft"] = tau_final["opd"] / tau_final["sft"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _warmup_tau(out: Path, cfg, target) -> float:
    """Held-out tau of the warm-up checkpoint with the preset's eval settings (the arms' starting point)."""
    from dopd.common.drafters import load_drafter
    from dopd.common.evaluation import quick_tau
    from dopd.common.prompts import encode_all, load_prompt_set, split_prompts
    from dopd.common.specdec import DecodeSettings

    settings = {"block_size": cfg.eval_block_size, "temperature": cfg.eval.temperature, "max_new_tokens": cfg.eval.max_new_tokens, "num_prompts": cfg.eval.num_prompts}
    f = out / "warmup" / "eval.json"
    if f.is_file():
        saved = json.loads(f.read_text())
        if saved["settings"] == settings:
            return saved["tau"]
    d = load_drafter(out / "warmup" / "drafter", target.info, target.embed_tokens.weight, target.lm_head.weight).to(target.device)
    sp = split_prompts(load_prompt_set(cfg.data.prompts), cfg.data.num_eval, cfg.data.seed, cfg.data.prompts)
    ids, _ = encode_all(target.tokenizer, sp.eval, cfg.data.max_prompt_tokens, drop_long=False)
    st = quick_tau(target, d, ids[: cfg.eval.num_prompts], DecodeSettings(block_size=cfg.eval_block_size, temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.rollout.batch_size, seed=cfg.seed))
    f.write_text(json.dumps({"settings": settings, "tau": st.tau, "alpha": st.alpha}))
    return st.tau


def _params(drafter_dir: Path) -> int:
    """Trained parameters of a saved drafter (every saved tensor but the draft->target id map)."""
    from safetensors.torch import load_file

    return sum(v.numel() for k, v in load_file(str(drafter_dir / "model.safetensors")).items() if k != "draft_ids")


def _plot(path: Path, results: dict, warm_flops: float, tau_warm: float, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"sft": "o-", "sft_on_opd_data": "s-", "opd": "D-", "opd_random_anchors": "^--", "opd_gamma1": "v--"}
    for arm, r in results.items():
        xs = [0.0] + [e["flops"] - warm_flops for e in r["evals"]]
        ys = [tau_warm] + [e["tau"] for e in r["evals"]]
        ax.plot(xs, ys, styles.get(arm, "o-"), label=arm)
    ax.set_xlabel("learner FLOPs after the shared SFT warm-up")
    ax.set_ylabel("held-out tau (tokens per verification step)")
    ax.set_title(f"Draft-OPD vs continued SFT at matched learner FLOPs ({target})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(s: dict) -> str:
    lines = [
        "# Plateau experiment", "", f"Command: `{s['command']}`", "",
        f"Target {s['target']}, {s['drafter']} drafter ({s['drafter_params']:,} trained parameters, draft vocabulary "
        f"{s['draft_vocab_size'] or 'full'}), K={s['block_size']}, {len(s['eval_prompts'])} held-out prompts "
        f"x {s['eval_max_new_tokens']} tokens, greedy.", "",
        f"Shared warm-up: {s['warmup_steps']} SFT steps, held-out tau {s['tau_warmup']:.3f}. Each arm then spends "
        f"{s['learner_flops']:.3g} learner FLOPs.", "",
        "| arm | final held-out tau | vs continued SFT |", "|---|---|---|",
    ]  # fmt: skip
    base = s["tau_final"].get("sft")
    for arm, t in s["tau_final"].items():
        rel = f"{t / base:.3f}x" if base else "-"
        lines.append(f"| {arm} | {t:.3f} | {rel} |")
    lines += [
        "", f"Draft-OPD rollout: {s['opd_rollout_tokens_per_s']:.1f} tokens/s; replay: {s['opd_replay_anchors_per_s']:.1f} anchors/s.",
        "Time share of the Draft-OPD arm: " + ", ".join(f"{k} {v:.0%}" for k, v in s["opd_time_share"].items()) + ".",
        "Rollout tokens/s of every arm that rolls out: " + ", ".join(f"{k} {v:.1f}" for k, v in s.get("arm_rollout_tokens_per_s", {}).items()) + ".", "",
    ]  # fmt: skip
    return "\n".join(lines)


def main_plateau(out: Path, preset: str, extra: list[str], arms: tuple[str, ...] = ARMS) -> dict:
    return plateau(out, preset, extra, arms, log=lambda m: print(m, file=sys.stderr))
