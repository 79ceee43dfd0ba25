"""Bebop's end-to-end objective (arXiv 2606.12370): minus the blocks' expected accepted length under rejection
sampling (`loss.e2e_estimator`: the unbiased path estimator, or the product form), with the score-function part of
its gradient (`loss.e2e_score`). Math: learner/losses.py `e2e_sums`."""

from __future__ import annotations

from dopd.common.config import Config
from dopd.common.errors import ConfigError

from ..losses import e2e_blocks, e2e_sums
from .base import BlockObjective, Mask, logq, register


@register
class ExpectedLength(BlockObjective):
    name = "expected_length"
    source = "Bebop, arXiv 2606.12370 (end-to-end expected accepted length)"
    defaults = {**BlockObjective.defaults, "acc_divergence": "fkl"}

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if cfg.rollout.temperature != 1.0 or cfg.rollout.top_p != 1.0:
            raise ConfigError(
                "loss.objective=expected_length is the acceptance of rejection sampling with the records' T = 1 target "
                f"probabilities: rollout.temperature=1 and rollout.top_p=1 (got {cfg.rollout.temperature}, {cfg.rollout.top_p})"
            )

    def mask(self, batch, t2d) -> Mask:
        return Mask({"acc": e2e_blocks(batch.targets)}, {"acc": self.lc.lambda_acc})

    def sums(self, drafter, batch, mask, step):
        return {"acc": e2e_sums(logq(drafter, batch), drafter.t2d, batch.targets, self.lc).acc}, {}
