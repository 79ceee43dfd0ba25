"""`dopd-experiments methods`: Draft-OPD, Bebop and DVI on one target, one learner budget, one held-out measurement.

Two groups of arms, each continuing from a shared SFT warm-up (a warm-up per drafter kind: EAGLE-3 and DVI) for the
same number of learner steps (the same number of records of the same micro-batch size; learner FLOPs are reported
next to it):

T = 1 (sampled decoding; rollouts by the engine with lossless rejection sampling), EAGLE-3 drafter:
  sft_kl        continued SFT on the target's greedy answers (forward KL to its top-k)
  opd_kl        Draft-OPD, the official EAGLE-3 recipe [docs/recipes.md R10] (training-time test, forward KL) on T = 1 rollouts
  bebop_tv      Bebop's per-position TV loss on the rollout's blocks (accepted positions + the first rejection)
  bebop_e2e     Bebop's end-to-end objective: the blocks' expected accepted length under rejection sampling
T = 0 (greedy):
  dvi_kl        DVI (the target's first k layers + a low-rank head), online KL only
  dvi_kl_rl     DVI, online KL, then reward-masked CE + policy gradient from half the budget on
  eagle3_kl_rl  an EAGLE-3 drafter of similar trainable size with the same online KL -> RL schedule

Held-out tau with two standard errors (steps treated as independent; the bootstrap over prompts) and paired
contrasts between arms over the same prompts (`experiments/stats.py`): at T = 0
exact from the cached greedy text (`dopd eval --simulate`); at T > 0 by the engine, repeated with new seeds until
SE <= `se_target` (or `max_passes`), once with rejection sampling and once with greedy-match acceptance (the same
drafter drafting greedily, accepted iff equal to the target's sample): Bebop's comparison. Resumable: an arm whose
summary.json exists is not run again, a finished evaluation is read back. Outputs in --out: results.json,
results.csv, summary.md (the table the README shows).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dopd.common import evaluation
from dopd.common.config import Config
from dopd.common.errors import DopdError
from dopd.common.evaluation import tau_se  # noqa: F401  (the histogram's tau and SE; tests read it here)
from dopd.common.load import load_config
from dopd.experiments.preset import Preset, choose
from dopd.experiments.stats import SIGNIFICANT_SE, PerPrompt, arm_mean_se, contrast

T1_ARMS = ("sft_kl", "opd_kl", "bebop_tv", "bebop_e2e")
T0_ARMS = ("dvi_kl", "dvi_kl_rl", "eagle3_kl_rl")
ARMS = T1_ARMS + T0_ARMS

PRESETS: dict[str, Preset] = {
    # SmolLM2-135M fp32 on CPU cores (measured: docs/methods/); DVI's rank 102 gives it 5.07M trainable
    # parameters, the 1-layer full-vocabulary EAGLE-3 has 5.09M
    "cpu": Preset(
        overrides=[
            "data.prompts=champ",
            "data.num_eval=16",
            "data.max_prompt_tokens=384",
            "sft.num_prompts=384",
            "sft.max_new_tokens=128",
            "rollout.max_new_tokens=128",
            "rollout.batch_size=8",
            "rollout.block_size=4",
            "learner.micro_batch_size=4",
            "learner.refresh_every=4",
            "learner.lr=1e-3",
            "learner.warmup_steps=10",
            "eval.num_prompts=16",
            "eval.max_new_tokens=128",
            "learner.checkpoint_every=1000000",
            "drafter.lora_rank=102",
        ],  # fmt: skip
        warmup_steps={"eagle3": 200, "dvi": 100},
        arm_steps=48,
        evals=4,
        se_target=0.03,
        max_passes=4,
    ),
    "gpu": Preset(
        overrides=[
            "data.prompts=champ",
            "data.num_eval=32",
            "data.max_prompt_tokens=512",
            "sft.num_prompts=2048",
            "sft.max_new_tokens=256",
            "rollout.max_new_tokens=256",
            "rollout.batch_size=32",
            "rollout.block_size=4",
            "learner.micro_batch_size=8",
            "learner.refresh_every=4",
            "learner.lr=5e-4",
            "learner.warmup_steps=20",
            "eval.num_prompts=32",
            "eval.max_new_tokens=128",
            "model.device=cuda",
            "model.dtype=bfloat16",
            "learner.checkpoint_every=1000000",
            "drafter.lora_rank=102",
        ],  # fmt: skip
        warmup_steps={"eagle3": 600, "dvi": 300},
        arm_steps=400,
        evals=8,
        se_target=0.03,
        max_passes=8,
    ),
    # the tiny random target: every arm, evaluation and report in minutes (tests)
    "smoke": Preset(
        overrides=[
            "model.target=tiny-random-llama",
            "data.prompts=champ-problems",
            "data.num_eval=4",
            "sft.num_prompts=16",
            "sft.max_new_tokens=16",
            "rollout.max_new_tokens=16",
            "rollout.batch_size=4",
            "rollout.block_size=3",
            "learner.micro_batch_size=2",
            "learner.refresh_every=2",
            "learner.lr=3e-3",
            "eval.num_prompts=3",
            "eval.max_new_tokens=12",
            "learner.checkpoint_every=1000000",
            "drafter.lora_rank=4",
        ],  # fmt: skip
        warmup_steps={"eagle3": 4, "dvi": 2},
        arm_steps=4,
        evals=2,
        se_target=0.03,
        max_passes=2,
    ),
}

T1 = ["rollout.temperature=1", "eval.temperature=1"]
# paired by prompt (experiments/stats.py); at T = 1 on rejection-sampling tau. Every arm is also compared with its warm-up,
# and at T = 1 greedy-match acceptance with rejection sampling for the same drafter (Bebop's comparison).
CONTRASTS = (
    ("opd_kl", "sft_kl"),
    ("bebop_tv", "sft_kl"),
    ("bebop_e2e", "sft_kl"),
    ("bebop_e2e", "bebop_tv"),
    ("dvi_kl_rl", "dvi_kl"),
    ("eagle3_kl_rl", "dvi_kl_rl"),
)


def arm_overrides(arm: str, warmup: int, budget: int) -> list[str]:
    """What makes each arm itself (on top of the preset)."""
    switch = f"dvi.rl_start_step={warmup + budget // 2}"  # the RL phase runs for the second half of the budget
    return {
        "sft_kl": ["drafter.kind=eagle3", "mode=sft", "loss.sft_objective=kl", "eval.temperature=1"],
        "opd_kl": ["drafter.kind=eagle3", "mode=opd", *T1],
        "bebop_tv": [
            "drafter.kind=eagle3",
            "mode=opd",
            *T1,
            "loss.response=blocks",
            "loss.acc_divergence=tv",
            "loss.lambda_rej=0",
        ],
        "bebop_e2e": ["drafter.kind=eagle3", "mode=opd", *T1, "loss.objective=expected_length"],
        "dvi_kl": ["drafter.kind=dvi", "mode=opd"],
        "dvi_kl_rl": ["drafter.kind=dvi", "mode=opd", switch],
        "eagle3_kl_rl": ["drafter.kind=eagle3", "mode=opd", "loss.objective=dvi", switch],
    }[arm]


def kind_of(arm: str) -> str:
    return "dvi" if arm.startswith("dvi") else "eagle3"


# --- held-out measurement ---------------------------------------------------------------------------------------


def heldout(
    target,
    drafter,
    prompt_ids: list[list[int]],
    cfg: Config,
    temperature: float,
    acceptance: str,
    se_target: float,
    max_passes: int,
) -> dict:
    """Held-out tau +- SE (dopd.common.evaluation.heldout: exact simulation at T = 0; the engine at T > 0, new seeds
    until SE <= se_target), plus its SE by the bootstrap over prompts."""
    from dopd.common.specdec import DecodeSettings

    s = DecodeSettings(block_size=cfg.eval_block_size, temperature=temperature, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.rollout.batch_size, seed=cfg.seed, acceptance=acceptance)  # fmt: skip
    res = evaluation.heldout(target, drafter, prompt_ids, s, simulate=True, se_target=se_target, max_passes=max_passes)
    res["se_prompts"] = arm_mean_se([PerPrompt(res["per_prompt_steps"], res["per_prompt_accepted"])])[1]
    return res


def _eval_prompts(cfg: Config, target) -> list[list[int]]:
    from dopd.prompts import run_prompts  # the runners' own split: the arms were evaluated on these

    return run_prompts(cfg, target.tokenizer).eval_ids[: cfg.eval.num_prompts]


def _final_eval(arm_dir: Path, cfg: Config, target, temperature: float, P: Preset) -> dict:
    """The arm's final drafter, measured once (cached in final_eval.json, keyed by its settings)."""
    from dopd.common.drafters import load_drafter

    rules = ("rejection", "match") if temperature > 0 else ("greedy",)
    key = {"temperature": temperature, "K": cfg.eval_block_size, "max_new_tokens": cfg.eval.max_new_tokens,
           "prompts": cfg.eval.num_prompts, "se_target": P.se_target, "max_passes": P.max_passes}  # fmt: skip
    f = arm_dir / f"final_eval_T{temperature:g}.json"
    if f.is_file():
        saved = json.loads(f.read_text())
        if saved.get("key") == key and all("per_prompt_steps" in r for r in saved["results"].values()):
            return saved  # (an evaluation from before per-prompt records is measured again)
    d = load_drafter(arm_dir / "drafter", target.info, target.embed_tokens.weight, target.lm_head.weight).to(
        target.device
    )
    ids = _eval_prompts(cfg, target)
    res = {
        r: heldout(target, d, ids, cfg, temperature, "rejection" if r == "greedy" else r, P.se_target, P.max_passes)
        for r in rules
    }
    out = {"key": key, "results": res, "trainable_params": d.num_parameters()}
    f.write_text(json.dumps(out, indent=1))
    return out


# --- the experiment ---------------------------------------------------------------------------------------------


def _rows(path: Path, event: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in open(path)) if r["event"] == event] if path.is_file() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _claim(run_dir: Path):
    """Hold `<run_dir>.lock` (this process's pid) while training there; yields False when a live process holds it.

    Arms can be split over processes on one --out (`--arms`, a process per core): without the lock, a second
    process reaching an arm another is still training would start it afresh (wiping its rows). A lock whose
    process is gone (killed, machine restarted) is taken over.
    """
    lock = run_dir.parent / f"{run_dir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            txt = lock.read_text().strip() if lock.is_file() else ""
            if not txt.isdigit() or _alive(int(txt)):  # (empty: its creator is writing its pid right now)
                yield False
                return
            lock.unlink(missing_ok=True)  # its process is gone
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _warmup(out: Path, kind: str, base: list[str], W: int, target, log) -> Path:
    """The shared SFT warm-up of a drafter kind (skipped when its checkpoint exists; waited for when another
    process is running it)."""
    from dopd.local import InProcess
    from dopd.train import train

    wdir = out / f"warmup_{kind}"
    ckpt = wdir / "checkpoints" / f"step_{W:07d}"
    while not ckpt.is_dir():
        with _claim(wdir) as mine:
            if mine:
                if not ckpt.is_dir():
                    log(f"== warm-up ({kind}): {W} SFT steps")
                    cfg = load_config(
                        None,
                        base
                        + [
                            f"drafter.kind={kind}",
                            "mode=sft",
                            f"learner.steps={W}",
                            f"learner.eval_every={W}",
                            f"out_dir={wdir}",
                        ],
                    )
                    train(cfg, InProcess(cfg, target=target, log=log))
                break
        log(f"   warm-up ({kind}) is being run by another process: waiting")
        time.sleep(10)
    return ckpt


def methods(out: Path, preset: str, extra: list[str], arms: tuple[str, ...] = ARMS, log=print) -> dict:
    from dopd.common.models import load_target
    from dopd.local import InProcess
    from dopd.train import train

    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise DopdError(f"unknown arm(s) {', '.join(bad)} (known: {', '.join(ARMS)})")
    P = choose(PRESETS, preset)
    out.mkdir(parents=True, exist_ok=True)
    base = P.overrides + list(extra)
    command = " ".join(["dopd-experiments", "methods", "--out", str(out), "--preset", preset]
                       + ([] if set(arms) == set(ARMS) else ["--arms", ",".join(arms)]) + list(extra))  # fmt: skip
    t_start = time.time()
    cfg0 = load_config(None, base)
    target = load_target(cfg0.model.target, cfg0.model.device, cfg0.model.dtype, forward=cfg0.model.forward)
    B = P.arm_steps
    eval_every = max(1, B // P.evals)
    results: dict[str, dict] = {}
    warm: dict[str, dict] = {}
    for arm in [a for a in ARMS if a in arms]:
        kind = kind_of(arm)
        W = P.warmup_for(kind)
        ckpt = _warmup(out, kind, base, W, target, log)
        adir = out / arm
        ov = arm_overrides(arm, W, B)
        steps = W + B if "mode=sft" in ov else B  # mode sft counts every step, mode opd the steps after the warm-up
        cfg = load_config(None, base + ov + [
            f"sft.warmup_steps={W}", f"learner.steps={steps}", f"learner.eval_every={eval_every}", f"out_dir={adir}",
            f"resume_from={ckpt}",
        ])  # fmt: skip
        temperature = cfg.eval.temperature
        if kind not in warm or temperature not in warm[kind]:
            wcfg = load_config(None, base + [f"drafter.kind={kind}", f"eval.temperature={temperature}"])
            warm.setdefault(kind, {})[temperature] = _final_eval(out / f"warmup_{kind}", wcfg, target, temperature, P)
        if not (adir / "summary.json").is_file():
            with _claim(adir) as mine:
                if mine and not (adir / "summary.json").is_file():
                    log(f"== arm {arm}")
                    train(cfg, InProcess(cfg, target=target, log=log))
            if not (adir / "summary.json").is_file():
                log(f"   arm {arm} is being run by another process ({adir}.lock): not in this call's results")
                continue
        summ = json.loads((adir / "summary.json").read_text())
        wsumm = json.loads((out / f"warmup_{kind}" / "summary.json").read_text())
        results[arm] = {
            "kind": kind, "temperature": temperature, "final": _final_eval(adir, cfg, target, temperature, P),
            "learner_steps": summ["steps"] - W, "learner_flops": summ["flops"] - wsumm["flops"],
            "time_s": _arm_time(summ, wsumm),
            "evals": [{"step": e["step"], "tau": e["tau"]} for e in _rows(adir / "metrics.jsonl", "eval")],
        }  # fmt: skip
    summary = {
        "contrasts": contrasts(results, warm), "significant_se": SIGNIFICANT_SE,
        "command": command, "preset": preset, "target": cfg0.model.target, "block_size": cfg0.eval_block_size,
        "eval_prompts": cfg0.eval.num_prompts, "eval_max_new_tokens": cfg0.eval.max_new_tokens,
        "budget_steps": B, "warmup_steps": P.warmup_steps, "se_target": P.se_target,
        "warmup": {k: {str(t): v for t, v in d.items()} for k, d in warm.items()}, "arms": results,
        "wall_s_this_call": time.time() - t_start,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    render_report(out)
    return summary


def render_report(d: Path) -> None:
    """results.csv and summary.md from a report directory's results.json (what a run writes, and what docs/methods
    keeps: a committed run's reports re-render from it)."""
    s = json.loads((d / "results.json").read_text())
    _csv(d / "results.csv", s)
    (d / "summary.md").write_text(markdown(s))


def _arm_time(arm: dict, warmup: dict) -> dict[str, float]:
    """Seconds the arm itself spent (its trainer's clocks carry on from the warm-up's), final evaluation excluded."""
    return {k: arm["time"][k] - warmup["time"][k] for k in ("rollout_s", "replay_s", "learner_s", "eval_s")}


def _main_result(final: dict) -> dict:
    r = final["results"]
    return r.get("rejection") or r["greedy"]


def _per_prompt(e: dict) -> PerPrompt:
    return PerPrompt(e["per_prompt_steps"], e["per_prompt_accepted"])


def contrasts(results: dict[str, dict], warm: dict[str, dict]) -> dict[str, dict]:
    """Paired contrasts over the same held-out prompts (one training seed each: training noise is not in the SE)."""
    out: dict[str, dict] = {}
    for x, y in CONTRASTS:
        if x in results and y in results and results[x]["temperature"] == results[y]["temperature"]:
            out[f"{x} - {y}"] = contrast(
                [_per_prompt(_main_result(results[x]["final"]))], [_per_prompt(_main_result(results[y]["final"]))]
            )
    for arm, r in results.items():
        w = warm.get(r["kind"], {}).get(r["temperature"])
        if w is not None:
            out[f"{arm} - warm-up"] = contrast([_per_prompt(_main_result(r["final"]))], [_per_prompt(_main_result(w))])
        res = r["final"]["results"]
        if "match" in res:
            out[f"{arm}: match - rejection"] = contrast([_per_prompt(res["match"])], [_per_prompt(res["rejection"])])
    return out


def _csv(path: Path, s: dict) -> None:
    rows = [
        (
            "arm",
            "kind",
            "temperature",
            "acceptance",
            "tau",
            "se",
            "se_prompts",
            "steps",
            "learner_steps",
            "learner_flops",
            "trainable_params",
        )
    ]
    for arm, r in s["arms"].items():
        for rule, e in r["final"]["results"].items():
            rows.append(
                (
                    arm,
                    r["kind"],
                    r["temperature"],
                    rule,
                    e["tau"],
                    e["se"],
                    e["se_prompts"],
                    e["steps"],
                    r["learner_steps"],
                    r["learner_flops"],
                    r["final"]["trainable_params"],
                )
            )
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def markdown(s: dict) -> str:
    def cell(e: dict | None) -> str:
        return "-" if e is None else f"{e['tau']:.3f} +- {e['se']:.3f} / {e['se_prompts']:.3f} ({e['steps']} steps)"

    lines = [
        "# Methods: Draft-OPD, Bebop, DVI", "", f"Command: `{s['command']}`", "",
        f"Target {s['target']}, K = {s['block_size']}, {s['eval_prompts']} held-out prompts x {s['eval_max_new_tokens']} "
        f"tokens; every arm trains {s['budget_steps']} learner steps after its kind's shared SFT warm-up "
        f"({', '.join(f'{k} {v} steps' for k, v in s['warmup_steps'].items())}). tau +- its standard error (steps "
        "treated as independent) / its SE by the bootstrap over prompts (the honest one: steps of one prompt are "
        "correlated); T = 0 exact from the cached greedy text, T = 1 by the engine.", "",
        "| arm | drafter | trainable params | T | tau, rejection sampling | tau, greedy match | learner FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for kind, by_t in s["warmup"].items():
        for t, w in by_t.items():
            r = w["results"]
            lines.append(
                f"| warm-up ({kind}) | {kind} | {w['trainable_params']:,} | {float(t):g} | {cell(_main_result(w))} | {cell(r.get('match'))} | - |"
            )
    for arm, a in s["arms"].items():
        r = a["final"]["results"]
        lines.append(f"| {arm} | {a['kind']} | {a['final']['trainable_params']:,} | {a['temperature']:g} | "
                     f"{cell(_main_result(a['final']))} | {cell(r.get('match'))} | {a['learner_flops']:.3g} |")  # fmt: skip
    lines += ["", "At T = 0 the single acceptance rule is greedy verification (its column: rejection sampling).", ""]
    lines += [
        f"Paired contrasts (same held-out prompts; SE = bootstrap over prompts, one training seed per arm, so training "
        f"noise is not in it; an effect counts beyond {s['significant_se']:g} SE; at T = 1 on rejection-sampling tau):", "",
        "| contrast | difference | SE | counts |", "|---|---|---|---|",
    ]  # fmt: skip
    for name, c in s["contrasts"].items():
        lines.append(f"| {name} | {c['diff']:+.3f} | {c['se']:.3f} | {'yes' if c['significant'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def main_methods(out: Path, preset: str, extra: list[str], arms: tuple[str, ...] = ARMS) -> dict:
    return methods(out, preset, extra, arms, log=lambda m: print(m, file=sys.stderr))
