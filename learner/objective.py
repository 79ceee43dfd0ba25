"""One learner forward: the drafter's inference-identical block forward, then the Draft-OPD or SFT loss.

Shared by the in-process trainer and the DeepSpeed ZeRO ranks, so both optimise the same number.
"""

from __future__ import annotations

import torch

from dopd.common.config import LossConfig
from dopd.common.drafters import Drafter

from .batch import TrainBatch
from .losses import LossParts, opd_loss, sft_loss


def compute_loss(drafter: Drafter, batch: TrainBatch, cfg: LossConfig, mode: str, denom: float | None = None) -> LossParts:
    """mode 'opd' -> acceptance-aware distillation over both streams; 'sft' -> teacher-forced objective.

    denom: the token weight to divide by instead of this batch's own (see `losses.loss_denominator`).
    """
    h = drafter.block_hidden(batch.tokens, batch.features, batch.lengths, batch.anchors, batch.block_tokens)
    logq = torch.log_softmax(drafter.logits(h).float(), dim=-1)
    if mode == "opd":
        return opd_loss(logq, drafter.t2d, batch.targets, cfg, denom)
    if mode == "sft":
        return sft_loss(logq, drafter.t2d, batch.targets, batch.step_weight, cfg.sft_objective, denom)
    raise ValueError(f"unknown loss mode '{mode}'")
