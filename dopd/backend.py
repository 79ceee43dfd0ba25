"""What the one training loop (dopd/train.py) needs from the place it runs, and the run state it keeps.

Two implementations: `InProcess` (dopd/local.py: one rollout worker and one learner rank in this process) and
`RayFleet` (dopd/driver.py: N rollout actors, S queue shards, M DeepSpeed ZeRO learner ranks on Ray). The loop owns
the schedule, the rows, the checkpoints and the summary; a backend owns placement, data movement and its own
accounts. Both hand the loop the same things, so both write the same files, fields and rows.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dopd.common.config import Config
from dopd.common.errors import ConfigError

if TYPE_CHECKING:
    from dopd.learner.learner import RankResult


@dataclass
class RunState:
    """The run's own state: saved in every checkpoint's state.json, in the summary, the same from both runners."""

    step: int = 0
    # the step this run started at (0, or the checkpoint `resume_from` names); eval_every counts from it
    start_step: int = 0
    policy_version: int = 0
    flops: float = 0.0  # learner FLOPs (forward + backward), summed over ranks
    records_trained: int = 0  # rollout records in learner steps
    rounds: int = 0  # rollout rounds (synchronous) or actor batches seen (asynchronous)
    rollout_tokens: int = 0
    replay_anchors: int = 0
    rollout_s: float = 0.0
    replay_s: float = 0.0
    learner_s: float = 0.0
    eval_s: float = 0.0
    resumes: int = 0
    history: list = field(default_factory=list)  # held-out evaluations (their rows)
    runner: dict = field(default_factory=dict)  # the backend's own state (worker cursors; the Ray runner's accounts)

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Accounts:
    """Where every record went and how the run was placed: the summary's runner fields, the same from both backends
    (in-process: one worker, one rank, no shards; the defaults are its values)."""

    records_produced: int
    records_consumed: int
    records_trained_twice: int = 0
    records_dropped_stale: int = 0
    records_dropped_full: int = 0
    records_rejected: int = 0
    records_lost_in_flight: int = 0
    records_queued: int = 0
    queue_peak_bytes: int = 0
    queue_max_bytes: int = 0
    exactly_once_state_bytes: int = 0
    actor_restarts: int = 0
    actors: int = 1
    learners: int = 1
    shards: int = 0
    zero_stage: int | None = None
    metrics_port: int | None = None
    # rollout.source=traffic: the served texts' hand-off (dopd/traffic.py FeedStats); empty otherwise
    traffic: dict = field(default_factory=dict)


@dataclass
class Summary:
    """summary.json: the run's outcome (written once, by dopd/train.py, for either backend)."""

    runner: str
    steps: int
    steps_planned: int
    policy_version: int
    flops: float
    tau: float  # the final held-out tau (of the saved drafter)
    alpha: list[float]
    records_trained: int
    drafter_params: int
    target: dict
    wall_s: float
    time: dict  # rollout_s, replay_s, learner_s, eval_s
    rollout_tokens: int
    replay_anchors: int
    resumes: int
    accounts: Accounts

    def to_dict(self) -> dict:
        """The JSON object: the run fields, then the backend's accounts at the top level."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "accounts"}
        return {**out, **asdict(self.accounts)}


class Backend(ABC):
    """Where a run executes. Methods are called by `dopd.train.train` in the order they are listed."""

    name: str  # the value of `runner` it implements

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        if cfg.runner != self.name:
            raise ConfigError(
                f"this config is for runner={cfg.runner}, not {self.name}: set runner={self.name} (or use the matching backend)"
            )
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out_dir)
        self.target_info: dict = {}

    def write_split(self, split: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "split.json").write_text(json.dumps(split, indent=1))

    @abstractmethod
    def start(self, state: RunState, ckpt, resumed: bool) -> None:
        """Place the workers; with a checkpoint (dopd/checkpoint.py) load the learners' state and pending records."""

    @abstractmethod
    def sft_data(self, needed: bool) -> None:
        """Hand the SFT data to the learners when the schedule still has SFT steps (`needed`) or a fresh reduced
        draft vocabulary is still to be chosen from it."""

    @abstractmethod
    def rollout(self, state: RunState) -> list[dict]:
        """Before an OPD step: produce what it needs (or collect what actors produced); one row per actor batch."""

    @abstractmethod
    def learn(self, phase: str, state: RunState) -> dict:
        """One optimizer step over every learner rank; the step's result summed / averaged over ranks."""

    @abstractmethod
    def publish(self, version: int) -> None:
        """The learners' weights -> every rollout copy, as policy `version`."""

    def observe(self, row: dict, state: RunState) -> None:
        """A row the loop just wrote to metrics.jsonl (the in-process runner feeds its TensorBoard / W&B sinks)."""

    def rollouts_done(self) -> None:
        """After the last learner step: nothing will train rollouts any more (the Ray runner stops its actors)."""

    @abstractmethod
    def evaluate(self) -> dict:
        """Held-out tau of the learners' current weights."""

    @abstractmethod
    def spec(self) -> dict:
        """The drafter's spec (its config.json)."""

    @abstractmethod
    def weights(self) -> dict:
        """The learners' current full weights."""

    @abstractmethod
    def training_state(self) -> dict:
        """Optimizer, schedule, every rank's RNGs and data position (learner/learner.py `merge_training_states`)."""

    @abstractmethod
    def drafter_params(self) -> int:
        """The drafter's trainable parameters."""

    def pending(self) -> list[bytes]:
        """Records produced but not trained yet, that a resumed run must train (a synchronous round in progress)."""
        return []

    def save_state(self, state: RunState) -> None:
        """Put the backend's own state into `state.runner` before a checkpoint."""

    @abstractmethod
    def accounts(self, state: RunState) -> Accounts:
        """Where every record went and how the run was placed (the summary's runner fields; the same keys from both)."""

    def finish(self, summary: dict) -> None:
        """After the summary is written."""

    def crashed(self, state: RunState, error: BaseException) -> BaseException | None:
        """Record what a failure lost; return an error to raise instead (one that says how to continue), or None."""
        return None

    def close(self) -> None:
        """Release what `start` placed."""


def aggregate(results: list[RankResult]) -> dict:
    """Learner ranks' results of one step -> one: loss, stream means averaged; counts, FLOPs and records summed."""
    n = len(results)
    out = {
        "loss": sum(r.loss for r in results) / n, "acc_div": sum(r.acc for r in results) / n,
        "rej_div": sum(r.rej for r in results) / n, "n_acc": sum(r.n_acc for r in results),
        "n_rej": sum(r.n_rej for r in results), "grad_norm": max(r.grad_norm for r in results), "lr": results[0].lr,
        "step_flops": sum(r.flops for r in results), "seconds": max(r.seconds for r in results),
        "positions": sum(r.positions for r in results), "records": sum(r.records for r in results),
        "staleness": [s for r in results for s in r.staleness],
        "refused": sum(r.refused for r in results),  # records a learner refused (counted at their shard)
    }  # fmt: skip
    info: dict = {}
    for r in results:
        for k, v in r.info.items():
            info.setdefault(k, []).append(v)
    for (
        k,
        vs,
    ) in info.items():  # diagnostics: numbers averaged over ranks (lists elementwise, None = no data), labels joined
        if all(isinstance(v, (int, float)) for v in vs):
            out[k] = sum(vs) / len(vs)
        elif all(isinstance(v, list) for v in vs):
            cols = [[x for x in col if x is not None] for col in zip(*vs)]
            out[k] = [sum(c) / len(c) if c else None for c in cols]
        else:
            out[k] = "/".join(sorted({str(v) for v in vs}))
    out["trained"] = [t for r in results for t in r.trained]
    out["uids"] = [u for r in results for u in r.uids]
    return out
