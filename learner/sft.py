"""SFT baselines on target-written text, in the form each drafter family is trained in public code.

- EAGLE-3 training-time test (TTT): a block at *every* answer position, unrolled `depth` >= K steps exactly as at
  inference (step j feeds the drafter's own hidden state and the true token), step j weighted
  ttt_step_weight^(j-1) (0.8 in EAGLE-3 / SpecForge).
- DFlash: blocks of K at random answer anchors, position j weighted exp(-(j-1)/decay) (SpecForge uses decay 7
  for 16-token blocks).
- DVI: one position per answer position (its teacher-forced early exit depends on nothing drafted, so a longer
  block would only repeat positions): every answer position once.
Objective: forward KL to the target's top-k (+ tail), cross-entropy to the target's token, or both.
"""

from __future__ import annotations

import numpy as np
import torch

from dopd.common.config import Config
from dopd.common.record import TeacherRecord

from .batch import TrainBatch, collate_teacher


def sft_depth(cfg: Config) -> int:
    if cfg.drafter.kind == "dvi":
        return 1
    if cfg.drafter.kind == "eagle3":
        return max(cfg.loss.ttt_depth or cfg.rollout.block_size, 1)
    return cfg.rollout.block_size


def step_weights(cfg: Config) -> torch.Tensor:
    D = sft_depth(cfg)
    j = torch.arange(D, dtype=torch.float32)
    if cfg.drafter.kind == "dvi":
        return torch.ones(D)
    if cfg.drafter.kind == "eagle3":
        return cfg.loss.ttt_step_weight**j
    if cfg.loss.dflash_decay is None:
        return torch.ones(D)
    return torch.exp(-j / cfg.loss.dflash_decay)


def sft_anchors(rec: TeacherRecord, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Answer positions to train blocks from: all of them (EAGLE-3 TTT) or a random subset (DFlash)."""
    n = rec.token_ids.shape[0]
    lo = max(rec.prompt_len, 2 if cfg.drafter.kind == "eagle3" else 1)
    span = np.arange(lo, n, dtype=np.int64)
    if cfg.drafter.kind == "dflash" and span.size > cfg.loss.dflash_anchors_per_seq:
        span = np.sort(rng.choice(span, size=cfg.loss.dflash_anchors_per_seq, replace=False))
    return span


def sft_batch(records: list[TeacherRecord], cfg: Config, rng: np.random.Generator, device) -> TrainBatch:
    anchors = [sft_anchors(r, cfg, rng) for r in records]
    return collate_teacher(records, anchors, sft_depth(cfg), step_weights(cfg), device)
