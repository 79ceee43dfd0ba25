"""The training loop: one for both runners. `train(cfg)` trains a drafter in one process or on Ray (`cfg.runner`).

    state = backend.start(checkpoint)                   # placement; a resumed run loads the learners' state
    evaluate (a fresh run: step 0)
    for each step until learner.steps (or learner.flops_budget):
        warm-up (SFT) steps, then Draft-OPD steps:
            OPD begins: publish the warmed-up drafter as a new policy version
            backend.rollout(): records for the step (a synchronous round, or what the actors produced meanwhile)
        backend.learn(phase): one optimizer step on every learner rank -> a step row
        every refresh_every OPD steps: publish (learners.gather_weights() -> fleet.set_weights())
        every eval_every steps of this run, and at the steps in eval_at: evaluate the learners' current weights
        every checkpoint_every steps: checkpoint (dopd/checkpoint.py: one format, either runner resumes it)
    evaluate, checkpoint, save the learners' final weights as drafter/, write summary.json

Files in out_dir, the same from both runners: config.yaml (the resolved config), split.json, metrics.jsonl (rows:
"step", "rollout", "eval"), opd_sequences.jsonl (every trained rollout record's text, by step), checkpoints/,
drafter/ (the learners' final weights), summary.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dopd import checkpoint
from dopd.backend import Backend, RunState
from dopd.common.config import Config, dump_config
from dopd.common.drafters import write_drafter
from dopd.common.errors import DopdError
from dopd.common.load import resolve
from dopd.common.models import resolve_dtype
from dopd.prompts import check_sources


def every(step: int, n: int, start: int = 0) -> bool:
    """The one cadence test: True at start + n, start + 2n, ... (never at `start` itself)."""
    return step > start and (step - start) % n == 0


@dataclass(frozen=True)
class Schedule:
    """Steps [0, warmup) are SFT, [warmup, total) Draft-OPD (mode=sft: all `learner.steps` are SFT)."""

    warmup: int
    total: int
    flops_budget: float | None = None

    @classmethod
    def of(cls, cfg: Config) -> Schedule:
        if cfg.mode == "sft":
            return cls(cfg.learner.steps, cfg.learner.steps, cfg.learner.flops_budget)
        return cls(cfg.sft.warmup_steps, cfg.sft.warmup_steps + cfg.learner.steps, cfg.learner.flops_budget)

    def phase(self, step: int) -> str:
        return "sft" if step < self.warmup else "opd"

    def done(self, state: RunState) -> bool:
        return state.step >= self.total or (self.flops_budget is not None and state.flops >= self.flops_budget)


def backend_for(cfg: Config, log: Callable[[str], None] = print, **kw) -> Backend:
    """The backend `cfg.runner` names."""
    if cfg.runner == "ray":
        from dopd.driver import RayFleet

        return RayFleet(cfg, log=log, **kw)
    from dopd.local import InProcess

    return InProcess(cfg, log=log, **kw)


class Rows:
    """metrics.jsonl (one JSON row per event) and opd_sequences.jsonl (the trained rollout records' text)."""

    def __init__(self, out: Path, observe: Callable[[dict], None] | None = None):
        self.out = out
        self.observe = observe  # the backend's metrics sinks see every row

    def clear(self) -> None:
        for stale in ("metrics.jsonl", "opd_sequences.jsonl", "summary.json"):
            (self.out / stale).unlink(missing_ok=True)

    def write(self, row: dict) -> dict:
        row = {"time": time.time(), **row}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.observe is not None:
            self.observe(row)
        return row

    def sequences(self, step: int, trained: list[dict]) -> None:
        if trained:
            with open(self.out / "opd_sequences.jsonl", "a") as f:
                for t in trained:
                    f.write(json.dumps({"step": step, **t}) + "\n")


def train(
    cfg: Config,
    backend: Backend | None = None,
    resume: bool = False,
    on_step: Callable[[Backend, int], None] | None = None,
) -> dict:
    """Train to the schedule and return the summary (also written to out_dir/summary.json).

    backend: where to run (default: the one `cfg.runner` names). resume: continue this out_dir from its newest good
    checkpoint. on_step(backend, step): called after every learner step (a hook for tests and tools).
    """
    resolve(cfg)  # idempotent: a loaded config is already resolved
    check_sources(cfg)  # before a backend loads the target: a missing data file is named first
    backend = backend if backend is not None else backend_for(cfg)
    log = backend.log
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(out, lambda row: backend.observe(row, state))
    sched = Schedule.of(cfg)
    lc = cfg.learner
    ckpt = (
        checkpoint.find(out, log)
        if resume
        else checkpoint.find(Path(cfg.resume_from), log)
        if cfg.resume_from
        else None
    )
    if ckpt is not None and not resume and lc.opd_optimizer == "fresh":
        if ckpt.step != sched.warmup:
            raise DopdError(
                f"learner.opd_optimizer=fresh starts the Draft-OPD phase afresh: {ckpt.path} is at step {ckpt.step}, the phase starts at sft.warmup_steps={sched.warmup}"
            )
        ckpt = replace(ckpt, fresh_optimizer=True)
    state = RunState()
    if ckpt is not None:
        state = RunState.from_dict(ckpt.state()["run"])
        if resume:
            state.resumes += 1
        else:  # a new run from another run's checkpoint: its own rows, its own evaluation cadence
            state.start_step = state.step
    if not resume:
        rows.clear()
    dump_config(cfg, out / "config.yaml")
    if cfg.loss.recipe is not None:  # a named recipe's keys this run changes: deliberate, and said at the start
        from dopd.common.recipes import recipe_named  # noqa: PLC0415

        dev = recipe_named(cfg.loss.recipe).deviations(cfg)
        log(
            f"dopd: loss.recipe={cfg.loss.recipe}"
            + (
                ", deviating in " + ", ".join(f"{k}={v!r} (recipe: {w!r})" for k, v, w in dev)
                if dev
                else ", no deviation"
            )
        )
    t_start = time.time()

    def log_phase(what: str) -> None:
        """A line per phase, with the time since the start: a newcomer can tell a slow run from a hung one."""
        log(f"== [{time.time() - t_start:6.0f}s] {what}")

    def evaluate() -> None:
        t0 = time.perf_counter()
        res = backend.evaluate()
        state.eval_s += time.perf_counter() - t0
        row = rows.write(
            {
                "event": "eval",
                "step": state.step,
                "flops": state.flops,
                "train_s": state.rollout_s + state.replay_s + state.learner_s,
                **res,
            }
        )
        state.history.append(row)
        log(
            f"[step {state.step}] held-out tau {row['tau']:.3f} ({row['steps']} steps{', simulated' if row.get('simulated') else ''})  alpha {' '.join(f'{a:.2f}' for a in row['alpha'])}  flops {row['flops']:.3g}"
        )

    def save() -> None:
        backend.save_state(state)
        checkpoint.write(
            out / "checkpoints",
            state.step,
            backend.spec(),
            backend.weights(),
            backend.training_state(),
            backend.pending(),
            {"run": asdict(state)},
        )

    def publish(version: int) -> None:
        state.policy_version = version
        backend.publish(version)

    try:
        dtype = resolve_dtype(cfg.model.dtype, cfg.model.device)
        log_phase(
            f"start: {cfg.runner} runner, target {cfg.model.target} ({dtype} on {cfg.model.device}), drafter {cfg.drafter.kind}"
        )
        backend.start(state, ckpt, resume)
        if ckpt is not None:
            log(
                f"dopd: {'resumed' if resume else 'started from'} {ckpt.path} at step {state.step}, policy version {state.policy_version}"
            )
        if state.step < sched.warmup:
            log_phase(
                f"SFT data: the target's answers to the warm-up prompts ({cfg.sft.max_new_tokens} tokens each; cached ones are read)"
            )
        backend.sft_data(needed=state.step < sched.warmup)
        if state.step == 0 and not state.history:
            evaluate()
        if sched.phase(state.step) == "opd" and state.step > sched.warmup:
            publish(state.policy_version)  # resumed inside the OPD phase: the rollout copies take the learners' weights
        if state.step < sched.warmup:
            log_phase(f"warm-up: {sched.warmup - state.step} SFT steps")
        while not sched.done(state):
            phase = sched.phase(state.step)
            if phase == "opd":
                if state.step == sched.warmup:
                    log_phase(
                        f"Draft-OPD: {sched.total - state.step} steps ({cfg.loss.objective}), new rollouts every {lc.refresh_every} steps"
                    )
                    publish(state.policy_version + 1)  # the first on-policy round rolls out the warmed-up drafter
                for r in backend.rollout(state):
                    state.rounds += 1
                    state.rollout_s += r["rollout_s"]
                    state.replay_s += r["replay_s"]
                    state.rollout_tokens += r["rollout_tokens"]
                    state.replay_anchors += r["replay_anchors"]
                    r = rows.write({"event": "rollout", "round": state.rounds - 1, **r})
                    if cfg.cluster.rollout == "sync" or state.rounds % 10 == 1:  # (async: every actor batch is a row)
                        log(
                            f"[round {r['round']}] actor {r['actor']} rollout tau {r['rollout_tau']:.3f} ({r['path']})  {r['rollout_tokens_per_s']:.1f} tok/s  replay {r['replay_anchors']} anchors"
                        )
            res = backend.learn(phase, state)
            state.step += 1
            state.flops += res["step_flops"]
            state.learner_s += res["seconds"]
            state.records_trained += res["records"]
            trained, _ = res.pop("trained"), res.pop("uids")
            rows.sequences(state.step, trained)
            row = rows.write(
                {
                    "event": "step",
                    "step": state.step,
                    "phase": phase,
                    **res,
                    "flops": state.flops,
                    "policy_version": state.policy_version,
                }
            )
            if state.step % 10 == 0 or state.step == 1 or state.step == sched.total:
                log(
                    f"[step {state.step}/{sched.total}] {phase} loss {row['loss']:.4f}  policy v{state.policy_version}  flops {state.flops:.3g}"
                )
            if phase == "opd" and every(state.step, lc.refresh_every, sched.warmup):
                publish(state.policy_version + 1)
            if every(state.step, lc.eval_every, state.start_step) or state.step in lc.eval_at:
                evaluate()
            if every(state.step, lc.checkpoint_every):
                save()
            if on_step is not None:
                on_step(backend, state.step)
        backend.rollouts_done()
        log_phase("final evaluation, checkpoint and drafter")
        if not state.history or state.history[-1]["step"] != state.step:
            evaluate()
        save()
        write_drafter(out / "drafter", backend.spec(), backend.weights())  # the learners' final weights
        last = state.history[-1]
        summary = {
            "runner": cfg.runner, "steps": state.step, "steps_planned": sched.total, "policy_version": state.policy_version,
            "flops": state.flops, "tau": last["tau"], "alpha": last["alpha"], "records_trained": state.records_trained,
            "drafter_params": backend.drafter_params(), "target": backend.target_info, "wall_s": time.time() - t_start,
            "time": {k: getattr(state, k) for k in ("rollout_s", "replay_s", "learner_s", "eval_s")},
            "rollout_tokens": state.rollout_tokens, "replay_anchors": state.replay_anchors, "resumes": state.resumes,
            **backend.accounts(state),
        }  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        backend.finish(summary)
        first = state.history[0]["tau"] if state.history else float("nan")
        log_phase(
            f"done: held-out tau {first:.3f} -> {last['tau']:.3f} ({last['steps']} verification steps); drafter in {out / 'drafter'}"
        )
        return summary
    except BaseException as e:
        instead = backend.crashed(state, e)
        if instead is not None:
            raise instead from None
        raise
    finally:
        backend.close()
