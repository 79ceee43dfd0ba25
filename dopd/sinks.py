"""TensorBoard and W&B beside Prometheus: the same metrics under the same names, written by existing writers.

Why: people who train drafters watch runs in TensorBoard or W&B; a second set of names would make them learn the
job twice. Every value is a series of `dopd/metrics.py` as Prometheus exports it (`dopd_heldout_tau`,
`dopd_learner_loss{stream="accepted"}`, counters as `_total`, histograms as `_sum` / `_count`), flattened to one
tag: `name/label=value,...` (`dopd_learner_loss/stream=accepted`, `dopd_acceptance_rate/source=heldout,position=1`;
TensorBoard groups tags by the part before the '/'). The x axis is the learner step.

Both are off by default, one key each: `metrics.tensorboard` writes event files with torch's SummaryWriter to
`<out_dir>/tensorboard` (`tensorboard --logdir <out_dir>/tensorboard`); `metrics.wandb` logs an offline W&B run
to `<out_dir>/wandb` (upload later with `wandb sync`), only where the `wandb` package is installed: it is not a
dopd dependency. The distributed runner feeds them from its `JobMetrics` (the same updates Prometheus gets); the
in-process runner, which serves no endpoint, turns its metrics.jsonl rows into the same updates (`RowMetrics`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dopd.common.errors import ConfigError

from .metrics import JobMetrics


class TensorBoardSink:
    def __init__(self, log_dir: Path, fresh: bool, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ConfigError(
                f"metrics.tensorboard=true needs the tensorboard package ({e}); pip install tensorboard"
            ) from None
        if fresh and log_dir.is_dir():  # a new run in an old directory: the old run's curves would overlap it
            for f in log_dir.glob("events.out.tfevents.*"):
                f.unlink()
        # a resumed run drops what the crashed one wrote after its last checkpoint (those steps are trained again)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=None if fresh else step)

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "metrics.wandb=true needs the wandb package (pip install wandb; it is not a dopd dependency)"
            ) from None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode="offline", dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "dopd"), name=name, config=config
        )

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The enabled sinks as one (`JobMetrics.attach` takes it)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, step: int, values: dict[str, float]) -> None:
        for s in self.sinks:
            s.write(step, values)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.sinks = []


def check_sinks(cfg) -> None:
    """What a run would need for its sinks, checked without starting one (`dopd config check`)."""
    m = cfg.metrics
    if m.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "metrics.tensorboard=true needs the tensorboard package; pip install tensorboard"
            ) from None
    if m.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "metrics.wandb=true needs the wandb package (pip install wandb; it is not a dopd dependency)"
            ) from None


def make_sinks(cfg, fresh: bool, step: int = 0) -> Sinks | None:
    """The sinks `cfg.metrics` turns on, or None. `fresh`: a new run (not a resume) in `cfg.out_dir`."""
    m, out = cfg.metrics, Path(cfg.out_dir)
    sinks: list = []
    if m.tensorboard:
        sinks.append(TensorBoardSink(out / "tensorboard", fresh, step))
    if m.wandb:
        sinks.append(WandbSink(out / "wandb", out.name, cfg.to_dict()))
    return Sinks(sinks) if sinks else None


class RowMetrics:
    """The in-process runner's metrics.jsonl rows as the distributed runner's `JobMetrics` updates (no endpoint),
    so both runners write the same names. `state()` is the runner's TrainState (cumulative FLOPs, learner time)."""

    def __init__(self, cfg, sinks: Sinks, state: Callable):
        self.cfg = cfg
        self.state = state
        self.metrics = JobMetrics()
        self.metrics.attach(sinks, step=lambda: self.state().step)
        self.flops = state().flops
        self.learner_s = state().learner_s

    @classmethod
    def for_config(cls, cfg, state: Callable, fresh: bool) -> RowMetrics | None:
        sinks = make_sinks(cfg, fresh, state().step)
        return None if sinks is None else cls(cfg, sinks, state)

    def observe(self, row: dict) -> None:
        m, st, ev = self.metrics, self.state(), row.get("event")
        if ev == "step":
            mb = self.cfg.learner.micro_batch_size
            m["dopd_policy_version"].set(row["policy_version"])
            m.learner(
                row["loss"], row["acc_div"], row["rej_div"], row["grad_norm"], st.learner_s - self.learner_s, row["flops"] - self.flops,
                mb, [0] * mb if row["phase"] == "opd" else [],  # in-process records are trained by the next version: 0 stale
            )  # fmt: skip
            m.diagnostics(row)
            self.flops, self.learner_s = row["flops"], st.learner_s
        elif ev == "rollout":
            n = self.cfg.learner.refresh_every * self.cfg.learner.micro_batch_size  # one round's records
            m.rollout(
                "0",
                row["rollout_tau"],
                row["rollout_alpha"],
                row["rollout_tokens"],
                row["rollout_s"],
                row["replay_anchors"],
                row["replay_s"],
                n,
            )
        elif ev == "eval":
            m.heldout(row["tau"], row["alpha"])

    def close(self) -> None:
        self.metrics.close()
