"""Draft-OPD: the accepted and rejected streams of the rollout's verification blocks, in one joint token mean.

Reproduces the official Draft-OPD recipe (facts and the checked files: ../shared/REFERENCES.md; learner/losses.py
for the per-position math). The accepted stream is the accepted positions (+ the first rejected one,
`loss.acc_at_first_rejection`) of blocks flagged STREAM_ACC, or, with `loss.response=ttt` (EAGLE-3's recipe), the
training-time test over every response position of the records' text; the rejected stream is the drafted tokens
from the first rejection to the block end, weighted gamma^(offset-1), of blocks flagged STREAM_REJ.
"""

from __future__ import annotations

import torch

from ..batch import sft_batch
from ..losses import _clamped, acc_divergence, opd_masks, rej_divergence, sft_per_position, sft_valid
from . import register
from .base import Mask, Objective, logq


@register
class DraftOPD(Objective):
    name = "opd"
    source = "Draft-OPD (the official code's accepted + rejected streams; ../shared/REFERENCES.md)"

    def prepare(self, batch, records, rng, device):
        if self.lc.response == "ttt":
            batch.ttt = sft_batch([r.as_teacher() for r in records], self.cfg, rng, device)
            # the TTT blocks are the accepted stream; verification blocks then feed only the rejected stream
            batch.targets.acc_block = torch.zeros_like(batch.targets.valid[..., 0])
        return batch

    def mask(self, batch, t2d) -> Mask:
        acc, rej = opd_masks(batch.targets, self.lc)
        if batch.ttt is not None:
            acc = sft_valid(batch.ttt.targets, t2d, batch.ttt.step_weight)
        return Mask({"acc": acc, "rej": rej}, {"acc": self.lc.lambda_acc, "rej": self.lc.lambda_rej or 0.0})

    def sums(self, drafter, batch, mask, step):
        acc_w, rej_w = mask.streams["acc"], mask.streams["rej"]
        out: dict[str, torch.Tensor] = {}
        blocks_acc = batch.ttt is None and bool(acc_w.any())
        if batch.ttt is not None:
            t = batch.ttt
            out["acc"] = (sft_per_position(logq(drafter, t), drafter.t2d, t.targets, self.lc.sft_objective) * acc_w).sum()
        if blocks_acc or bool((rej_w > 0).any()):
            lq = logq(drafter, batch)
            zero = lq.sum() * 0.0
            T = batch.targets
            if batch.ttt is None:
                out["acc"] = (_clamped(acc_divergence(self.lc.acc_divergence, lq, drafter.t2d, T), self.lc) * acc_w).sum() if blocks_acc else zero
            out["rej"] = (_clamped(rej_divergence(self.lc.rej_divergence, lq, drafter.t2d, T), self.lc) * rej_w).sum() if bool((rej_w > 0).any()) else zero
        if not out:
            raise ValueError("an OPD batch with nothing to train (no accepted or rejected positions, no TTT positions)")
        return out, {}
