"""The supervised warm-up (and `mode=sft`): teacher-forced blocks laid out by the drafter kind's SFT plan
(learner/batch.py `sft_batch`), forward KL to the target's top-k (+ tail), cross-entropy to its token, or both
(`loss.sft_objective`), each position weighted by the plan's step weight."""

from __future__ import annotations

from ..losses import sft_per_position, sft_valid
from .base import Mask, Objective, logq


class SFT(Objective):
    name = "sft"
    source = "SpecForge's EAGLE-3 training-time test and DFlash random-anchor blocks [docs/recipes.md R18, R19] (the kind's SFT plan)"

    def mask(self, batch, t2d) -> Mask:
        return Mask({"acc": sft_valid(batch.targets, t2d, batch.step_weight)}, {"acc": 1.0})

    def sums(self, drafter, batch, mask, step):
        per = sft_per_position(logq(drafter, batch), drafter.t2d, batch.targets, self.lc.sft_objective)
        return {"acc": (per * mask.streams["acc"]).sum()}, {}
