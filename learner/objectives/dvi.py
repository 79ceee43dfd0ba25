"""DVI's online schedule (arXiv 2510.05421): forward KL on every drafted position up to and including each block's
first rejection, then (from `dvi.rl_start_step`) KL + reward-masked cross-entropy + policy gradient with a batch-mean
baseline. Per-sample math: learner/losses.py `dvi_sums`; the phase goes into the step row (`dvi_phase`)."""

from __future__ import annotations

from dopd.common.config import Config
from dopd.common.errors import ConfigError

from ..losses import dvi_samples, dvi_sums
from .base import BlockObjective, Mask, logq, register


@register
class DVI(BlockObjective):
    name = "dvi"
    source = "DVI, arXiv 2510.05421 (online KL, then reward-masked CE + policy gradient)"
    defaults = {**BlockObjective.defaults, "acc_divergence": "fkl"}

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if not cfg.loss.acc_at_first_rejection:
            raise ConfigError(
                "loss.objective=dvi samples every drafted position up to and including the first rejection: loss.acc_at_first_rejection must be true"
            )

    def mask(self, batch, t2d) -> Mask:
        return Mask({"acc": dvi_samples(batch.targets)}, {"acc": self.lc.lambda_acc})

    def sums(self, drafter, batch, mask, step):
        s, phase = dvi_sums(
            logq(drafter, batch), drafter.t2d, batch.targets, self.lc, self.cfg.dvi, step, sample=mask.streams["acc"]
        )
        return {"acc": s.acc}, {"dvi_phase": phase}
