"""The T = 0 rollout at prefill speed: the cached greedy text, cut into verification steps by the current drafter.

What the engine would record at each step, from cheaper sources (`common/greedy.py`, `common/resegment.py`):
- block starts, drafted tokens, accept masks: the drafter's greedy blocks walked along the text (drafter only);
- the target's distribution at the accepted positions and the first rejection: their prefix is the target's own
  text, so they are rows of the one cached prefill (no target work per round);
- the target's distribution after the first rejection (its prefix holds the drafter's wrong token) and p(d) of the
  rejected token itself: one tree-masked target forward per batch over the drafted tails (`actors/scoring.py`),
  only when the rejected stream needs them (`score=True`). Unscored blocks feed only the accepted stream.
Tests check the result against the engine's records step for step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dopd.common.config import Config
from dopd.common.drafters import Drafter
from dopd.common.greedy import GreedyText
from dopd.common.models import Target
from dopd.common.record import SOURCE_ROLLOUT, STREAM_ACC, STREAM_BOTH, Blocks, TeacherRecord
from dopd.common.resegment import Segmentation, segment

from .rollout import Rolled
from .scoring import score_branches
from .target_text import text_data


@dataclass
class ResegStats:
    accepted: list[int]
    new_tokens: int
    draft_s: float
    target_s: float  # prefill of new texts + tail scoring
    scored_tokens: int


def _lookup(ids: np.ndarray, probs: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """p(tok) from top-k rows (0 where tok is outside the top-k)."""
    return (probs * (ids == tok[..., None])).sum(-1).astype(np.float32)


def blocks_from(seg: Segmentation, pre: TeacherRecord, topk: int) -> Blocks:
    """The steps as Blocks, with the prefill's target rows at every position (rows after the first rejection are
    placeholders until `score_tails` fills them)."""
    S, K = seg.draft_tokens.shape
    rows = seg.anchors[:, None] + np.arange(K)[None, :] - 1  # teacher row predicting the block's position j
    ids = pre.topk_ids[rows][..., :topk]
    probs = pre.topk_probs[rows][..., :topk]
    tail = pre.tail[rows]
    d = seg.draft_tokens
    pd = _lookup(ids, probs, d)
    after = np.arange(K)[None, :] > seg.accepted[:, None]  # past the first rejection: not the target's prefix
    ids = np.where(after[..., None], 0, ids)
    probs = np.where(after[..., None], 0.0, probs)
    tail = np.where(after, 0.0, tail)
    pd = np.where(after, 0.0, pd)
    return Blocks(
        anchor=seg.anchors.astype(np.int32), draft_tokens=d.astype(np.int32), draft_logprobs=seg.draft_logprobs.astype(np.float32),
        target_topk_ids=ids.astype(np.int32), target_topk_probs=probs.astype(np.float32), target_tail=tail.astype(np.float32),
        target_draft_prob=pd.astype(np.float32), accept_mask=seg.accept_mask, source=np.full(S, SOURCE_ROLLOUT, dtype=np.uint8),
        streams=np.full(S, STREAM_ACC, dtype=np.uint8),
    )  # fmt: skip


@torch.no_grad()
def score_tails(target: Target, texts: list[GreedyText], blocks: list[Blocks], topk: int) -> int:
    """Fill every block's target distribution from the first rejection on (in place); returns tokens scored.

    Block at prefix a with r accepted drafts (r < K): p(d_{r+1}) is read at the text's row a+r-1 (a correct
    prefix); positions r+2..K condition on d_{r+1}.., so d_{r+1}..d_{K-1} form a branch starting at position a+r.
    """
    seqs, branches, need = [], [], []
    for t, b in zip(texts, blocks):
        K = b.block_size
        acc = b.accept_mask.astype(np.int64).cumprod(-1).sum(-1)
        rej = np.nonzero(acc < K)[0]
        br = [(int(b.anchor[m] + acc[m]), b.draft_tokens[m, acc[m] : K - 1].tolist()) for m in rej]
        hi = max([s for s, _ in br], default=0)
        seqs.append(t.tokens[: max(hi, 1)])
        branches.append(br)
        need.append((rej, acc))
    if not any(len(r) for r, _ in need):
        return 0
    seq_h, br_h = score_branches(target, seqs, branches)
    scored = 0
    for i, (b, (rej, acc)) in enumerate(zip(blocks, need)):
        if not len(rej):
            b.streams[:] = STREAM_BOTH
            continue
        K = b.block_size
        rows = torch.as_tensor([int(b.anchor[m] + acc[m] - 1) for m in rej], device=seq_h[i].device)
        first = torch.log_softmax(target.lm_head(seq_h[i][rows]).float(), -1)  # [R, V] at the first rejection
        d_first = torch.as_tensor(b.draft_tokens[rej, acc[rej]].astype(np.int64), device=first.device)
        b.target_draft_prob[rej, acc[rej]] = first.gather(-1, d_first[:, None]).squeeze(-1).exp().cpu().numpy()
        for k, m in enumerate(rej):
            h = br_h[i][k]
            if h.shape[0] == 0:
                continue
            lsm = torch.log_softmax(target.lm_head(h).float(), -1)  # positions acc+2 .. K
            tk = lsm.topk(topk, -1)
            p = tk.values.exp()
            j0 = int(acc[m]) + 1
            d = torch.as_tensor(b.draft_tokens[m, j0:K].astype(np.int64), device=lsm.device)
            b.target_topk_ids[m, j0:K] = tk.indices.cpu().numpy()
            b.target_topk_probs[m, j0:K] = p.cpu().numpy()
            b.target_tail[m, j0:K] = (1 - p.sum(-1)).clamp_min(0).cpu().numpy()
            b.target_draft_prob[m, j0:K] = lsm.gather(-1, d[:, None]).squeeze(-1).exp().cpu().numpy()
            scored += h.shape[0]
        b.streams[:] = STREAM_BOTH
    return scored + sum(len(r) for r, _ in need)


def resegmented_rollout(
    target: Target, drafter: Drafter, prompts: list[tuple], cfg: Config, score: bool, log=None, hidden: bool = False
) -> tuple[list[Rolled], ResegStats]:
    """Greedy rollout by re-segmentation: records equal to the engine's at T = 0 (scored tails when `score`; the
    target's final hidden state along its text in `Rolled.teacher` when `hidden`)."""
    r = cfg.rollout
    K, topk = r.block_size, r.topk
    t0 = time.perf_counter()
    texts, pre = text_data(  # the target's greedy text, or the dataset's answer for (id, prompt, answer) items
        target, drafter.feature_layers, prompts, r.max_new_tokens, topk,
        feature_dtype=target.dtype, with_lookahead=True, log=log, hidden=hidden,
    )  # fmt: skip
    t1 = time.perf_counter()
    segs = segment(drafter, texts, [p.features for p in pre], K, batch_size=r.batch_size, dtype=target.dtype)
    t2 = time.perf_counter()
    blocks = [blocks_from(s, p, topk) for s, p in zip(segs, pre)]
    scored = score_tails(target, texts, blocks, topk) if score else 0
    t3 = time.perf_counter()
    out = [
        Rolled(pid, t.prompt_ids + t.answer, t.prompt_len, p.features, b, scored=score, teacher=p)
        for (pid, *_), t, p, b in zip(prompts, texts, pre, blocks)
    ]
    acc = [int(a) for s in segs for a in s.accepted]
    stats = ResegStats(acc, sum(len(t.answer) for t in texts), t2 - t1, (t1 - t0) + (t3 - t2), scored)
    return out, stats
