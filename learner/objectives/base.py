"""What an objective is: one object that says where a batch is trained (one mask) and what it sums there.

The learner asks an objective for three things, in this order, every step:
1. `prepare(batch, records, rng)`: anything the objective adds to the collated batch (EAGLE-3's training-time test
   builds its teacher-forced sub-batch here);
2. `mask(batch, t2d)`: a `Mask`, the position weights of each loss stream, from the batch alone (no forward). Its
   `weight` is the step's normaliser; a learner group all-reduces it before the forward, so every rank divides by
   the token weight of the whole global batch;
3. `loss(drafter, batch, mask, step, denom)`: the streams' sums under that same mask, divided by the normaliser.
   An objective implements `sums` only; the division, the per-stream diagnostics and the step-row fields are done
   here once, so the weight and the sums cannot disagree and a new objective cannot forget a branch.

An objective registers itself (`register`) under its `name`, the value of `loss.objective`; its `defaults` are
loss settings it implies (filled at config load where the config leaves them unset), `records` declares what the
actor must record for it (filled into `loss.records`, which is all the actor reads) and `check` refuses settings
it cannot train. `source` names what it reproduces (paper, or file and commit of the official code).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from dopd.common.config import Config
from dopd.common.errors import ConfigError
from dopd.common.registry import Registry

from ..losses import EPS, LossParts

if TYPE_CHECKING:
    from dopd.common.drafters import Drafter

    from ..batch import TrainBatch


@dataclass
class Mask:
    """Per-stream position weights (0 = not trained; any shape per stream: positions [B,M,K], or blocks [B,M] for
    an objective normalised per block) and each stream's lambda. Streams named "acc" and "rej" feed the step row's
    acc_div / n_acc and rej_div / n_rej; any other stream is logged by name. `counts` replaces a stream's share of
    the normaliser where it is not the sum of its weights (the official [docs/recipes.md R3] accepted stream counts every response token
    of the batch, supervised or not). Whatever the unit, `weight` is one number a learner group all-reduces."""

    streams: dict[str, torch.Tensor]
    lambdas: dict[str, float]
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def weight(self) -> float:
        """The normaliser of the joint mean: sum over streams of lambda * (the stream's count, by default the sum of
        its weights)."""
        return sum(self.lambdas[s] * self.counts.get(s, float(w.sum())) for s, w in self.streams.items())


class Objective(ABC):
    name: ClassVar[str]
    source: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}  # loss.* settings this objective implies (filled where unset, at load)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lc = cfg.loss

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse settings this objective cannot train (ConfigError naming the key); called at config load."""

    @classmethod
    def records(cls, cfg: Config) -> set[str]:
        """What the actor must record for this objective (filled into `loss.records` at load, which is all the actor
        reads): "blocks" (the verification blocks feed the accepted stream), "teacher" (per-position top-k + tail
        along the text), "hidden" (the target's final hidden state along the answer), "scored" (rejected tails
        scored by the target). By default the rollout's blocks, their scored tails when the rejected stream is on,
        and the hidden state for exact full-vocabulary targets."""
        lc = cfg.loss
        return {"blocks"} | ({"scored"} if lc.lambda_rej else set()) | ({"hidden"} if lc.targets == "full" else set())

    def prepare(self, batch: TrainBatch, records: list, rng: np.random.Generator, device) -> TrainBatch:
        return batch

    @abstractmethod
    def mask(self, batch: TrainBatch, t2d: torch.Tensor) -> Mask: ...

    @abstractmethod
    def sums(
        self, drafter: Drafter, batch: TrainBatch, mask: Mask, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(per-stream loss sums under `mask`, extra diagnostics for the step row). `step`: the 0-based learner step."""

    def loss(
        self, drafter: Drafter, batch: TrainBatch, mask: Mask, step: int = 0, denom: float | None = None
    ) -> LossParts:
        """sum over streams of lambda * sum, over `denom` (an all-reduced weight) or this batch's own `mask.weight`."""
        sums, info = self.sums(drafter, batch, mask, step)
        d = mask.weight if denom is None else denom
        total = None
        for s, v in sums.items():
            term = mask.lambdas[s] * v
            total = term if total is None else total + term
        stats = {s: _stream_stats(sums[s], mask.streams[s]) for s in sums}
        acc, rej = stats.get("acc", (0.0, 0.0, 0)), stats.get("rej", (0.0, 0.0, 0))
        for s, (mean, _, n) in stats.items():
            if s not in ("acc", "rej"):
                info = {**info, f"{s}_div": mean, f"n_{s}": n}
        return LossParts(
            loss=total / max(d, EPS), acc=acc[0], rej=rej[0], n_acc=acc[2], n_rej=rej[2], w_rej=rej[1], info=info
        )


def _stream_stats(s: torch.Tensor, w: torch.Tensor) -> tuple[float, float, int]:
    """(mean loss per unit weight, total weight, positions with weight > 0) of one stream."""
    total = float(w.sum())
    return float(s.detach()) / max(total, EPS), total, int((w > 0).sum())


def logq(drafter: Drafter, b: TrainBatch) -> torch.Tensor:
    """The drafter's log-distribution at every block position of a batch (the inference-identical block forward)."""
    h = drafter.block_hidden(b.tokens, b.features, b.lengths, b.anchors, b.block_tokens)
    return torch.log_softmax(drafter.logits(h).float(), dim=-1)


class BlockObjective(Objective):
    """An objective over the rollout's own verification blocks only (DVI, Bebop's expected length, exact TV, LK):
    no rejected stream, no extra or shuffled anchors; `check` refuses settings that would train anything else."""

    defaults: ClassVar[dict[str, Any]] = {"response": "blocks", "lambda_rej": 0.0}

    @classmethod
    def check(cls, cfg: Config) -> None:
        lc, what = cfg.loss, f"loss.objective={cfg.loss.objective}"
        if lc.response != "blocks":
            raise ConfigError(
                f"{what} trains the rollout's verification blocks: loss.response must be blocks (got {lc.response})"
            )
        if lc.lambda_rej:
            raise ConfigError(f"{what} has no rejected stream: loss.lambda_rej must be 0 (got {lc.lambda_rej})")
        if cfg.replay.extra != "none" or cfg.replay.anchors != "rollout":
            raise ConfigError(f"{what} trains the rollout's own blocks: replay.extra=none and replay.anchors=rollout")


OBJECTIVES: Registry[type[Objective]] = Registry("objectives", "loss.objective")
# class decorator: an objective registers itself under `cls.name` (the value of `loss.objective`)
register = OBJECTIVES.register
