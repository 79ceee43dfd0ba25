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
from dopd.backend import Backend, RunState, Summary
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
    run = _Run(cfg, backend if backend is not None else backend_for(cfg), resume)
    try:
        run.begin()
        while not run.sched.done(run.state):
            run.step()
            if on_step is not None:
                on_step(run.backend, run.state.step)
        return run.end()
    except BaseException as e:
        instead = run.backend.crashed(run.state, e)
        if instead is not None:
            raise instead from None
        raise
    finally:
        run.backend.close()


class _Run:
    """One call of `train`: the run state, its files and the cadences; the backend does the work."""

    def __init__(self, cfg: Config, backend: Backend, resume: bool):
        self.cfg, self.backend, self.resume, self.log = cfg, backend, resume, backend.log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = Rows(self.out, lambda row: backend.observe(row, self.state))
        self.sched = Schedule.of(cfg)
        self.ckpt = self._checkpoint()
        self.state = RunState()
        if self.ckpt is not None:
            self.state = RunState.from_dict(self.ckpt.state()["run"])
            if resume:
                self.state.resumes += 1
            else:  # a new run from another run's checkpoint: its own rows, its own evaluation cadence
                self.state.start_step = self.state.step
        if not resume:
            self.rows.clear()
        dump_config(cfg, self.out / "config.yaml")
        self._say_recipe()
        self.t_start = time.time()

    def _checkpoint(self):
        """The checkpoint this run continues (resume) or starts from (`resume_from`), or None."""
        cfg, log = self.cfg, self.log
        if self.resume:
            ckpt = checkpoint.find(self.out, log)
        elif cfg.resume_from:
            ckpt = checkpoint.find(Path(cfg.resume_from), log)
        else:
            return None
        if ckpt is not None and not self.resume and cfg.learner.opd_optimizer == "fresh":
            if ckpt.step != self.sched.warmup:
                raise DopdError(
                    f"learner.opd_optimizer=fresh starts the Draft-OPD phase afresh: {ckpt.path} is at step {ckpt.step}, the phase starts at sft.warmup_steps={self.sched.warmup}"
                )
            ckpt = replace(ckpt, fresh_optimizer=True)
        return ckpt

    def _say_recipe(self) -> None:
        """A named recipe's keys this run changes: deliberate, and said at the start."""
        cfg = self.cfg
        if cfg.loss.recipe is None:
            return
        from dopd.common.recipes import recipe_named  # noqa: PLC0415

        dev = recipe_named(cfg.loss.recipe).deviations(cfg)
        said = ", ".join(f"{k}={v!r} (recipe: {w!r})" for k, v, w in dev)
        self.log(f"dopd: loss.recipe={cfg.loss.recipe}" + (f", deviating in {said}" if dev else ", no deviation"))

    def log_phase(self, what: str) -> None:
        """A line per phase, with the time since the start: a newcomer can tell a slow run from a hung one."""
        self.log(f"== [{time.time() - self.t_start:6.0f}s] {what}")

    def evaluate(self) -> None:
        st = self.state
        t0 = time.perf_counter()
        res = self.backend.evaluate()
        st.eval_s += time.perf_counter() - t0
        train_s = st.rollout_s + st.replay_s + st.learner_s
        row = self.rows.write({"event": "eval", "step": st.step, "flops": st.flops, "train_s": train_s, **res})
        st.history.append(row)
        self.log(
            f"[step {st.step}] held-out tau {row['tau']:.3f} ({row['steps']} steps{', simulated' if row.get('simulated') else ''})  alpha {' '.join(f'{a:.2f}' for a in row['alpha'])}  flops {row['flops']:.3g}"
        )

    def save(self) -> None:
        b = self.backend
        b.save_state(self.state)
        checkpoint.write(
            self.out / "checkpoints", self.state.step, b.spec(), b.weights(), b.training_state(), b.pending(),
            {"run": asdict(self.state)},
        )  # fmt: skip

    def publish(self, version: int) -> None:
        self.state.policy_version = version
        self.backend.publish(version)

    def begin(self) -> None:
        """Start the backend, the SFT data, the step-0 evaluation; where a resumed run left off, the weights."""
        cfg, st, sched, ckpt = self.cfg, self.state, self.sched, self.ckpt
        dtype = resolve_dtype(cfg.model.dtype, cfg.model.device)
        self.log_phase(
            f"start: {cfg.runner} runner, target {cfg.model.target} ({dtype} on {cfg.model.device}), drafter {cfg.drafter.kind}"
        )
        self.backend.start(st, ckpt, self.resume)
        if ckpt is not None:
            self.log(
                f"dopd: {'resumed' if self.resume else 'started from'} {ckpt.path} at step {st.step}, policy version {st.policy_version}"
            )
        if st.step < sched.warmup:
            self.log_phase(
                f"SFT data: the target's answers to the warm-up prompts ({cfg.sft.max_new_tokens} tokens each; cached ones are read)"
            )
        self.backend.sft_data(needed=st.step < sched.warmup)
        if st.step == 0 and not st.history:
            self.evaluate()
        if sched.phase(st.step) == "opd" and st.step > sched.warmup:
            self.publish(
                st.policy_version
            )  # resumed inside the OPD phase: the rollout copies take the learners' weights
        if st.step < sched.warmup:
            self.log_phase(f"warm-up: {sched.warmup - st.step} SFT steps")

    def rollouts(self) -> None:
        """An OPD step's rollouts (none where the backend's records still suffice): one row per rollout batch."""
        cfg, st = self.cfg, self.state
        if st.step == self.sched.warmup:
            self.log_phase(
                f"Draft-OPD: {self.sched.total - st.step} steps ({cfg.loss.objective}), new rollouts every {cfg.learner.refresh_every} steps"
            )
            self.publish(st.policy_version + 1)  # the first on-policy round rolls out the warmed-up drafter
        for r in self.backend.rollout(st):
            st.rounds += 1
            st.rollout_s += r["rollout_s"]
            st.replay_s += r["replay_s"]
            st.rollout_tokens += r["rollout_tokens"]
            st.replay_anchors += r["replay_anchors"]
            r = self.rows.write({"event": "rollout", "round": st.rounds - 1, **r})
            if cfg.cluster.rollout == "sync" or st.rounds % 10 == 1:  # (async: every actor batch is a row)
                self.log(
                    f"[round {r['round']}] actor {r['actor']} rollout tau {r['rollout_tau']:.3f} ({r['path']})  {r['rollout_tokens_per_s']:.1f} tok/s  replay {r['replay_anchors']} anchors"
                )

    def step(self) -> None:
        """One learner step (after its rollouts in the OPD phase), its row, and what falls due after it."""
        st, sched, lc = self.state, self.sched, self.cfg.learner
        phase = sched.phase(st.step)
        if phase == "opd":
            self.rollouts()
        res = self.backend.learn(phase, st)
        st.step += 1
        st.flops += res["step_flops"]
        st.learner_s += res["seconds"]
        st.records_trained += res["records"]
        trained, _ = res.pop("trained"), res.pop("uids")
        self.rows.sequences(st.step, trained)
        row = self.rows.write(
            {
                "event": "step",
                "step": st.step,
                "phase": phase,
                **res,
                "flops": st.flops,
                "policy_version": st.policy_version,
            }
        )
        if st.step % 10 == 0 or st.step == 1 or st.step == sched.total:
            self.log(
                f"[step {st.step}/{sched.total}] {phase} loss {row['loss']:.4f}  policy v{st.policy_version}  flops {st.flops:.3g}"
            )
        if phase == "opd" and every(st.step, lc.refresh_every, sched.warmup):
            self.publish(st.policy_version + 1)
        if every(st.step, lc.eval_every, st.start_step) or st.step in lc.eval_at:
            self.evaluate()
        if every(st.step, lc.checkpoint_every):
            self.save()

    def end(self) -> dict:
        """The final evaluation (of the final weights), checkpoint, drafter and summary."""
        st, b, out = self.state, self.backend, self.out
        b.rollouts_done()
        self.log_phase("final evaluation, checkpoint and drafter")
        if not st.history or st.history[-1]["step"] != st.step:
            self.evaluate()
        self.save()
        write_drafter(out / "drafter", b.spec(), b.weights())  # the learners' final weights
        last = st.history[-1]
        summary = Summary(
            runner=self.cfg.runner, steps=st.step, steps_planned=self.sched.total, policy_version=st.policy_version,
            flops=st.flops, tau=last["tau"], alpha=last["alpha"], records_trained=st.records_trained,
            drafter_params=b.drafter_params(), target=b.target_info, wall_s=time.time() - self.t_start,
            time={k: getattr(st, k) for k in ("rollout_s", "replay_s", "learner_s", "eval_s")},
            rollout_tokens=st.rollout_tokens, replay_anchors=st.replay_anchors, resumes=st.resumes,
            accounts=b.accounts(st),
        ).to_dict()  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        b.finish(summary)
        first = st.history[0]["tau"] if st.history else float("nan")
        self.log_phase(
            f"done: held-out tau {first:.3f} -> {last['tau']:.3f} ({last['steps']} verification steps); drafter in {out / 'drafter'}"
        )
        return summary
