"""One learner step's batch and loss: the drafter's inference-identical block forward, then the recipe's objective.

Shared by the in-process runner and the DeepSpeed ZeRO ranks, so both optimise the same number. `cfg` is the whole
run config; the loss settings are `cfg.effective_loss()` (the official recipe for the drafter kind, unless set).

- mode "sft": teacher-forced blocks (EAGLE-3 training-time test / DFlash random anchors), `learner/sft.py`;
- mode "opd": the records' verification blocks (accepted and rejected streams, `learner/losses.py`), and with
  `loss.response=ttt` (EAGLE-3's recipe) the training-time test over every response position of the records' text
  as the accepted stream, in one joint token mean with the rejected stream; or, by `loss.objective`, DVI's
  online schedule (`dvi_sums`, phase by the learner step) or Bebop's end-to-end expected length (`e2e_sums`).
"""

from __future__ import annotations

import numpy as np
import torch

from dopd.common.config import Config
from dopd.common.drafters import Drafter
from dopd.common.drafters.dvi import on_text_positions
from dopd.common.record import ExperienceRecord, TeacherRecord

from .batch import TrainBatch, collate_records
from .losses import (
    LossParts, StreamSums, block_sums, block_weight, dvi_samples, dvi_sums, e2e_blocks, e2e_sums, finish, sft_loss,
    sft_sums, sft_valid,
)  # fmt: skip
from .sft import sft_batch


def opd_batch(records: list[ExperienceRecord], cfg: Config, rng: np.random.Generator, device) -> TrainBatch:
    """Experience records -> the block batch, plus the TTT sub-batch when the recipe trains every position."""
    batch = collate_records(records, device)
    if cfg.drafter.kind == "dvi":
        # the DVI drafter's training forward (teacher-forced early exit) is exact where the block's inputs are the
        # committed text: every position up to each first rejection; the rest is not trained
        batch.targets.valid &= on_text_positions(batch.tokens, batch.lengths, batch.anchors, batch.block_tokens)
    if cfg.effective_loss().response == "ttt":
        batch.ttt = sft_batch([r.as_teacher() for r in records], cfg, rng, device)
        # the TTT blocks are the accepted stream; verification blocks then feed only the rejected stream
        batch.targets.acc_block = torch.zeros_like(batch.targets.valid[..., 0])
    return batch


def make_batch(records: list[ExperienceRecord] | list[TeacherRecord], cfg: Config, mode: str, rng: np.random.Generator, device) -> TrainBatch:
    if mode == "opd":
        return opd_batch(records, cfg, rng, device)  # type: ignore[arg-type]
    if mode == "sft":
        return sft_batch(records, cfg, rng, device)  # type: ignore[arg-type]
    raise ValueError(f"unknown loss mode '{mode}'")


def _logq(drafter: Drafter, b: TrainBatch) -> torch.Tensor:
    h = drafter.block_hidden(b.tokens, b.features, b.lengths, b.anchors, b.block_tokens)
    return torch.log_softmax(drafter.logits(h).float(), dim=-1)


def _has_blocks(b: TrainBatch, cfg) -> bool:
    w = block_weight(b.targets, cfg)
    return w.n_acc > 0 or w.w_rej > 0


def stream_weights(drafter: Drafter, batch: TrainBatch, cfg: Config, mode: str) -> StreamSums:
    """The batch's token weights without a forward (learner ranks all-reduce them before the step)."""
    lc = cfg.effective_loss()
    if mode == "sft":
        w = float(sft_valid(batch.targets, drafter.t2d, batch.step_weight).sum())
        z = torch.zeros(())
        return StreamSums(z, w, z, 0.0)
    z = torch.zeros(())
    if lc.objective == "dvi":
        return StreamSums(z, float(dvi_samples(batch.targets).sum()), z, 0.0)
    if lc.objective == "expected_length":
        return StreamSums(z, float(e2e_blocks(batch.targets).sum()), z, 0.0)
    s = block_weight(batch.targets, lc)
    if batch.ttt is not None:
        s.n_acc += float(sft_valid(batch.ttt.targets, drafter.t2d, batch.ttt.step_weight).sum())
    return s


def denominator(drafter: Drafter, batch: TrainBatch, cfg: Config, mode: str) -> float:
    lc = cfg.effective_loss()
    s = stream_weights(drafter, batch, cfg, mode)
    return s.n_acc if mode == "sft" else s.weight(lc)


def compute_loss(drafter: Drafter, batch: TrainBatch, cfg: Config, mode: str, denom: float | None = None, step: int = 0) -> LossParts:
    """mode 'opd' -> the recipe's objective on rollout records (`loss.objective`: Draft-OPD's streams, DVI's schedule,
    Bebop's expected length); 'sft' -> the teacher-forced objective.

    denom: the token weight to divide by instead of this batch's own (`denominator`, all-reduced across ranks).
    step: the 0-based learner step this loss is for (DVI's KL -> RL switch).
    """
    lc = cfg.effective_loss()
    if mode == "sft":
        return sft_loss(_logq(drafter, batch), drafter.t2d, batch.targets, batch.step_weight, lc.sft_objective, denom)
    if mode != "opd":
        raise ValueError(f"unknown loss mode '{mode}'")
    if lc.objective == "dvi":
        s, phase = dvi_sums(_logq(drafter, batch), drafter.t2d, batch.targets, lc, cfg.dvi, step)
        parts = finish(s, lc, denom)
        parts.phase = phase
        return parts
    if lc.objective == "expected_length":
        return finish(e2e_sums(_logq(drafter, batch), drafter.t2d, batch.targets, lc), lc, denom)
    total: StreamSums | None = None
    if batch.ttt is not None:
        t = batch.ttt
        total = sft_sums(_logq(drafter, t), drafter.t2d, t.targets, t.step_weight, lc.sft_objective)
    if _has_blocks(batch, lc):
        s = block_sums(_logq(drafter, batch), drafter.t2d, batch.targets, lc)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("an OPD batch with nothing to train (no accepted or rejected positions, no TTT positions)")
    return finish(total, lc, denom)
