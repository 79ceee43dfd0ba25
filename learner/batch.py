"""Records -> padded tensors for one learner step.

Both record kinds become the same `TrainBatch` (sequence tokens + target features + blocks + block targets), so
one drafter forward and one loss module serve Draft-OPD and the SFT baselines. Teacher-forced (SFT) blocks are laid
out by the drafter kind's SFT plan (`sft_batch`: the kind's depth, anchors and step weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dopd.common.drafters import kind_class
from dopd.common.record import SOURCE_ROLLOUT, STREAM_ACC, STREAM_REJ, ExperienceRecord, TeacherRecord

from .losses import BlockTargets


@dataclass
class TrainBatch:
    tokens: torch.Tensor  # [B,S]
    features: torch.Tensor  # [B,S,F] (position t holds f_t; rows beyond n-2 are zero)
    lengths: torch.Tensor  # [B]
    anchors: torch.Tensor  # [B,M] (0 = padding block)
    block_tokens: torch.Tensor  # [B,M,K]
    targets: BlockTargets
    step_weight: torch.Tensor | None = None  # [K] (SFT)
    num_records: int = 0
    ttt: TrainBatch | None = None  # teacher-forced blocks at every response position (EAGLE-3's recipe)
    # answer tokens of the batch's records, supervised or not (the official [docs/recipes.md R3] denominator)
    response_tokens: int = 0

    @property
    def num_positions(self) -> int:
        return int(self.targets.valid.sum())


def _seq_tensors(token_ids: list[np.ndarray], feats: list[torch.Tensor], device, dtype):
    B = len(token_ids)
    S = max(t.shape[0] for t in token_ids)
    F = feats[0].shape[1]
    tokens = torch.zeros(B, S, dtype=torch.long)
    features = torch.zeros(B, S, F, dtype=dtype)
    for i, (t, f) in enumerate(zip(token_ids, feats)):
        tokens[i, : t.shape[0]] = torch.from_numpy(t.astype(np.int64))
        features[i, : f.shape[0]] = f.to(dtype)
    lengths = torch.tensor([t.shape[0] for t in token_ids])
    return tokens.to(device), features.to(device), lengths.to(device)


def _block_buffers(B: int, M: int, K: int, k: int) -> tuple[torch.Tensor, ...]:
    """Zeroed (anchors, draft tokens, top-k ids, top-k probs, tail, p(d), accept, valid) for B x M blocks of K."""
    z = torch.zeros
    return (
        z(B, M, dtype=torch.long), z(B, M, K, dtype=torch.long), z(B, M, K, k, dtype=torch.long), z(B, M, K, k),
        z(B, M, K), z(B, M, K), z(B, M, K, dtype=torch.bool), z(B, M, K, dtype=torch.bool),
    )  # fmt: skip


def _hidden_rows(
    hiddens: list[torch.Tensor | None], prompt_lens: list[int], rows: torch.Tensor, device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The records' target hidden states (rows prompt_len-1 .. n-2 of each record) at the sequence rows `rows`
    [B,...] (the row predicting each position): ([B,...,H], available [B,...]), or (None, None) if none carries them."""
    if all(h is None for h in hiddens):
        return None, None
    H = next(h for h in hiddens if h is not None).shape[1]
    out = torch.zeros(*rows.shape, H, dtype=torch.bfloat16)
    ok = torch.zeros(rows.shape, dtype=torch.bool)
    for i, (h, P) in enumerate(zip(hiddens, prompt_lens)):
        if h is None:
            continue
        idx = rows[i] - (P - 1)
        have = (idx >= 0) & (idx < h.shape[0])
        out[i][have] = h[idx[have]].to(torch.bfloat16)
        ok[i] = have
    return out.to(device), ok.to(device)


def collate_records(records: list[ExperienceRecord], device, dtype=torch.float32) -> TrainBatch:
    """Experience records' blocks -> a batch for the block objective (each block keeps its stream flags)."""
    if any(r.features is None for r in records):
        raise ValueError("experience records need target features for training")
    blocks = [r.blocks for r in records]
    tokens, features, lengths = _seq_tensors(
        [r.token_ids for r in records], [r.features for r in records], device, dtype
    )
    M = max(1, max(len(b) for b in blocks))
    K = records[0].blocks.block_size
    anchors, draft, ids, probs, tail, pd, acc, valid = _block_buffers(
        len(records), M, K, records[0].blocks.target_topk_ids.shape[2]
    )
    streams = torch.zeros(len(records), M, dtype=torch.long)
    rollout = torch.zeros(len(records), M, dtype=torch.bool)
    for i, b in enumerate(blocks):
        m = len(b)
        if not m:
            continue
        anchors[i, :m] = torch.from_numpy(b.anchor.astype(np.int64))
        draft[i, :m] = torch.from_numpy(b.draft_tokens.astype(np.int64))
        ids[i, :m] = torch.from_numpy(b.target_topk_ids.astype(np.int64))
        probs[i, :m] = torch.from_numpy(b.target_topk_probs)
        tail[i, :m] = torch.from_numpy(b.target_tail)
        pd[i, :m] = torch.from_numpy(b.target_draft_prob)
        acc[i, :m] = torch.from_numpy(b.accept_mask)
        valid[i, :m] = True
        streams[i, :m] = torch.from_numpy(b.streams.astype(np.int64))
        rollout[i, :m] = torch.from_numpy(b.source == SOURCE_ROLLOUT)
    T = BlockTargets(
        ids,
        probs,
        tail,
        draft,
        pd,
        acc,
        valid,
        (streams & STREAM_ACC) > 0,
        (streams & STREAM_REJ) > 0,
        rollout_block=rollout,
    ).to(device)
    rows = anchors[..., None] + torch.arange(K) - 1  # the sequence row predicting block position j (0-based)
    T.hidden, T.hidden_ok = _hidden_rows(
        [r.target_hidden for r in records], [r.prompt_len for r in records], rows, device
    )
    n_resp = sum(r.num_tokens - r.prompt_len for r in records)
    return TrainBatch(
        tokens, features, lengths, anchors.to(device), draft.to(device), T, None, len(records), response_tokens=n_resp
    )


def collate_teacher(
    records: list[TeacherRecord],
    anchors: list[np.ndarray],
    K: int,
    step_weight: torch.Tensor,
    device,
    dtype=torch.float32,
) -> TrainBatch:
    """Teacher-forced sequences with chosen anchors -> K-position blocks whose inputs are the true tokens.

    Block position j of anchor a predicts token a+j-1; its target is the teacher distribution at position a+j-2.
    """
    tokens, features, lengths = _seq_tensors(
        [r.token_ids for r in records], [r.features for r in records], device, dtype
    )
    M = max(1, max(a.size for a in anchors))
    anc, draft, ids, probs, tail, pd, _, valid = _block_buffers(len(records), M, K, records[0].topk_ids.shape[1])
    for i, (r, a) in enumerate(zip(records, anchors)):
        m = a.size
        if not m:
            continue
        n = r.token_ids.shape[0]
        tgt_pos = a[:, None] + np.arange(K)[None, :]  # token positions a+j-1 for j = 1..K
        ok = tgt_pos <= n - 1
        tp = np.minimum(tgt_pos, n - 1)
        dist = tp - 1  # teacher row predicting that token
        anc[i, :m] = torch.from_numpy(a.astype(np.int64))
        draft[i, :m] = torch.from_numpy(r.token_ids[tp].astype(np.int64))
        ids[i, :m] = torch.from_numpy(r.topk_ids[dist].astype(np.int64))
        probs[i, :m] = torch.from_numpy(r.topk_probs[dist])
        tail[i, :m] = torch.from_numpy(r.tail[dist])
        hit = r.topk_ids[dist] == r.token_ids[tp][..., None]
        pd[i, :m] = torch.from_numpy((r.topk_probs[dist] * hit).sum(-1).astype(np.float32))
        valid[i, :m] = torch.from_numpy(ok)
    T = BlockTargets(ids, probs, tail, draft, pd, valid.clone(), valid).to(device)
    rows = anc[..., None] + torch.arange(K) - 2  # teacher row predicting block position j (token a+j-1)
    T.hidden, T.hidden_ok = _hidden_rows([r.hidden for r in records], [r.prompt_len for r in records], rows, device)
    if T.hidden_ok is not None:
        T.hidden_ok &= T.valid
    n_resp = sum(r.num_tokens - r.prompt_len for r in records)
    return TrainBatch(
        tokens,
        features,
        lengths,
        anc.to(device),
        draft.to(device),
        T,
        step_weight,
        len(records),
        response_tokens=n_resp,
    )


def sft_batch(records: list[TeacherRecord], cfg, rng: np.random.Generator, device) -> TrainBatch:
    """Teacher-forced blocks as the drafter kind trains them in public code (its `sft_*` declarations)."""
    kind = kind_class(cfg.drafter.kind)
    anchors = [kind.sft_anchors(r, cfg, rng) for r in records]
    return collate_teacher(records, anchors, kind.sft_depth(cfg), kind.sft_step_weights(cfg), device)


def opd_batch(records: list[ExperienceRecord], cfg, device) -> TrainBatch:
    """Experience records' blocks, restricted to the positions where the kind's training forward is exact and,
    unless `loss.train_past_end`, to positions inside each record's committed answer (the official [docs/recipes.md R1] segments end at
    the response's end; what follows is the greedy lookahead exact acceptance is measured against)."""
    batch = collate_records(records, device)
    T = batch.targets
    keep = kind_class(cfg.drafter.kind).trainable_positions(
        batch.tokens, batch.lengths, batch.anchors, batch.block_tokens
    )
    if keep is not None:
        T.valid &= keep
    if not cfg.loss.train_past_end:
        K = T.valid.shape[-1]
        pos = batch.anchors[..., None] + torch.arange(K, device=batch.anchors.device)  # token index of position j
        T.valid &= pos < batch.lengths[:, None, None]
    if T.hidden_ok is not None:
        T.hidden_ok &= T.valid
    return batch
