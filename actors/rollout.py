"""Target-assisted rollout: speculative decoding with the current drafter, keeping what training needs.

Because the target verifies every token, the committed text is the target's own (greedy at T=0, exactly the
target's sampling distribution at T>0) while every verification step exposes where *this* drafter fails on
prefixes its own proposals produced. Two paths give the same `Rolled` sequences:

- `engine_rollout`: the speculative engine decodes step by step (any temperature; the reference path);
- `actors/resegmented.py`: at T = 0, the cached greedy text re-segmented by the current drafter (drafter forwards
  only; the target scores only drafted tokens after a first rejection, when the loss needs them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dopd.common.config import RolloutConfig
from dopd.common.drafters import Drafter
from dopd.common.models import Target
from dopd.common.record import SOURCE_ROLLOUT, STREAM_ACC, STREAM_BOTH, Blocks, TeacherRecord
from dopd.common.specdec import DecodeSettings, EngineStats, SeqResult, SpecEngine


@dataclass
class Rolled:
    """One rolled-out sequence, whichever path produced it."""

    prompt_id: str
    tokens: list[int]  # prompt + committed answer
    prompt_len: int
    features: torch.Tensor  # [>= n-1, F] target features (position t at row t)
    blocks: Blocks  # the rollout's verification steps, one block each (source rollout)
    scored: bool  # the blocks hold the target's distribution after the first rejection (the rejected stream)
    teacher: TeacherRecord | None = None  # the target's top-k at every position (rows >= n-1), when known

    @property
    def accepted(self) -> np.ndarray:
        return self.blocks.accept_mask.astype(np.int64).cumprod(-1).sum(-1)


def rollout_settings(cfg: RolloutConfig, seed: int) -> DecodeSettings:
    return DecodeSettings(
        block_size=cfg.block_size, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, record=True, topk=cfg.topk, keep_features=True, seed=seed,
    )  # fmt: skip


def rollout(
    target: Target, drafter: Drafter, prompt_ids: list[list[int]], cfg: RolloutConfig, seed: int
) -> tuple[list[SeqResult], EngineStats]:
    """Speculative decoding to completion for every prompt (continuous batching), with records and features."""
    was = drafter.training
    drafter.eval()
    try:
        return SpecEngine(target, drafter).generate(prompt_ids, rollout_settings(cfg, seed))
    finally:
        drafter.train(was)


def rollout_blocks(seq: SeqResult) -> Blocks:
    """The rollout's own verification steps as training blocks (source = rollout, both streams)."""
    if not seq.steps:
        raise ValueError("rollout_blocks needs a sequence decoded with record=True")
    st = seq.steps
    return Blocks(
        anchor=np.asarray([s.prefix_len for s in st], dtype=np.int32),
        draft_tokens=np.stack([s.draft_tokens for s in st]).astype(np.int32),
        draft_logprobs=np.stack([s.draft_logprobs for s in st]).astype(np.float32),
        target_topk_ids=np.stack([s.target_topk_ids for s in st]).astype(np.int32),
        target_topk_probs=np.stack([s.target_topk_probs for s in st]).astype(np.float32),
        target_tail=np.stack([s.target_tail for s in st]).astype(np.float32),
        target_draft_prob=np.stack([s.target_draft_prob for s in st]).astype(np.float32),
        accept_mask=np.stack([s.accept_mask for s in st]).astype(np.bool_),
        source=np.full(len(st), SOURCE_ROLLOUT, dtype=np.uint8),
        streams=np.full(len(st), STREAM_BOTH, dtype=np.uint8),
    )


def engine_rollout(
    target: Target, drafter: Drafter, prompts: list[tuple[str, list[int]]], cfg: RolloutConfig, seed: int
) -> tuple[list[Rolled], EngineStats]:
    """The engine path: every verification step's target distribution comes from the verification itself."""
    seqs, st = rollout(target, drafter, [p for _, p in prompts], cfg, seed)
    out = [
        Rolled(pid, s.prompt_ids + s.output_ids, len(s.prompt_ids), s.features, rollout_blocks(s), scored=True)
        for (pid, _), s in zip(prompts, seqs)
    ]
    return out, st


def error_positions(seq: Rolled) -> np.ndarray:
    """Prefix lengths just before each rejected draft token (a + number accepted), inside the final sequence.

    A step with prefix a that accepted n < K drafts rejected the token at position a+n: error replay drafts again
    from the committed prefix x_0..x_{a+n-1}. Steps where everything was accepted expose no error.
    """
    b = seq.blocks
    K = b.block_size
    acc = seq.accepted
    pos = b.anchor.astype(np.int64) + acc
    keep = (acc < K) & (pos < len(seq.tokens))
    return pos[keep]


def acc_only(b: Blocks) -> Blocks:
    """The same blocks feeding only the accepted stream (their post-rejection targets were not scored)."""
    return Blocks(
        **{**{f: getattr(b, f) for f in Blocks.FIELDS}, "streams": np.full(len(b), STREAM_ACC, dtype=np.uint8)}
    )
