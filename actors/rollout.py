"""Target-assisted rollout: speculative decoding with the current drafter, keeping what training needs.

Because the target verifies every token, the committed text is the target's own (greedy at T=0, exactly the
target's sampling distribution at T>0) while every verification step exposes where *this* drafter fails on
prefixes its own proposals produced. Per sequence we keep the committed tokens, the target features of every
committed position, and one verification record per step; the steps where a draft token was rejected are the
error positions that replay starts from.
"""

from __future__ import annotations

import numpy as np
import torch

from dopd.common.config import RolloutConfig
from dopd.common.drafters import Drafter
from dopd.common.models import Target
from dopd.common.record import SOURCE_ROLLOUT, Blocks, ExperienceRecord
from dopd.common.specdec import DecodeSettings, EngineStats, SeqResult, SpecEngine


def rollout_settings(cfg: RolloutConfig, seed: int) -> DecodeSettings:
    return DecodeSettings(
        block_size=cfg.block_size, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, record=True, topk=cfg.topk, keep_features=True, seed=seed,
    )  # fmt: skip


def rollout(target: Target, drafter: Drafter, prompt_ids: list[list[int]], cfg: RolloutConfig, seed: int) -> tuple[list[SeqResult], EngineStats]:
    """Speculative decoding to completion for every prompt (continuous batching), with records and features."""
    was = drafter.training
    drafter.eval()
    try:
        return SpecEngine(target, drafter).generate(prompt_ids, rollout_settings(cfg, seed))
    finally:
        drafter.train(was)


def error_positions(seq: SeqResult) -> np.ndarray:
    """Prefix lengths just before each rejected draft token (a + number accepted), inside the final sequence.

    A step with prefix a that accepted n < K drafts rejected the token at position a+n: replay drafts again from
    the committed prefix x_0..x_{a+n-1}. Steps where everything was accepted expose no error.
    """
    total = len(seq.prompt_ids) + len(seq.output_ids)
    out = []
    for st in seq.steps:
        K = len(st.draft_tokens)
        n_acc = int(st.accept_mask.sum())
        pos = st.prefix_len + n_acc
        if n_acc < K and pos < total:
            out.append(pos)
    return np.asarray(out, dtype=np.int64)


def rollout_blocks(seq: SeqResult) -> Blocks:
    """The rollout's own verification steps as training blocks (source = rollout)."""
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
    )


def make_records(
    seqs: list[SeqResult],
    replayed: list[Blocks],
    prompt_ids: list[str],
    version: int,
    actor_id: int,
    incarnation: int,
    seq_no: int,
    meta: dict,
) -> list[ExperienceRecord]:
    """Rollout steps + replayed blocks of each sequence -> one experience record per sequence (bf16 features)."""
    out = []
    for i, (s, rb, pid) in enumerate(zip(seqs, replayed, prompt_ids)):
        tok = np.asarray(s.prompt_ids + s.output_ids, dtype=np.int32)
        blocks = Blocks.concat([rollout_blocks(s), rb]) if s.steps else rb
        out.append(
            ExperienceRecord(
                prompt_id=pid, token_ids=tok, prompt_len=len(s.prompt_ids), blocks=blocks,
                features=s.features.to(torch.bfloat16), actor_id=actor_id, incarnation=incarnation,
                seq_no=seq_no + i, policy_version=version, meta=meta,
            )  # fmt: skip
        )
    return out
