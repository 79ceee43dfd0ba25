"""Greedy speculative decoding replayed on a known text: where blocks start, what was drafted, what was accepted.

At T = 0 speculative decoding commits exactly the target's greedy text, whatever the drafter; the drafter only
decides how that text is cut into verification steps. Given the text (`common/greedy.py`, with its lookahead past
the answer's end) and the target features of every position, the cut is computed with drafter forwards only:

  n = prompt length; while n < answer end:
      d_1..d_K = the drafter's greedy block at prefix n      (what `SpecEngine` would draft there)
      accepted = leading j with d_j == x_{n+j-1}             (greedy verification: draft == target's argmax)
      n += min(accepted + 1, answer end - n)                 (accepted drafts + the correction or bonus token)

The drafter's block at every answer position comes from ONE batched `draft_blocks` call (the same computation as
its inference forward, tested against it), so the walk itself is a few integer comparisons. Accepted counts are
taken before truncation at the answer's end, as the engine counts them, so tau and alpha are the engine's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .drafters import Drafter
from .greedy import GreedyText
from .specdec import EngineStats


@dataclass
class Segmentation:
    """The verification steps greedy speculative decoding takes through one text."""

    anchors: np.ndarray  # [S] prefix length at each step (the block predicts positions a..a+K-1)
    draft_tokens: np.ndarray  # [S, K] the drafter's greedy block there
    draft_logprobs: np.ndarray  # [S, K] raw log q(d)
    accepted: np.ndarray  # [S] accepted drafts (before truncation at the answer's end)
    committed: np.ndarray  # [S] tokens the step commits (after truncation)
    # accepted drafts of a block started at EVERY answer position [A] (not only where steps start): acceptance
    # averaged over positions, which an anchor-placement effect should move less than tau
    everywhere: np.ndarray | None = None

    @property
    def accept_mask(self) -> np.ndarray:
        K = self.draft_tokens.shape[1]
        return np.arange(K)[None, :] < self.accepted[:, None]


def _pad(features: list[torch.Tensor], S: int, dev, dtype: torch.dtype) -> torch.Tensor:
    F = features[0].shape[1]
    out = torch.zeros(len(features), S, F, device=dev, dtype=dtype)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f.to(dev, dtype)
    return out


@torch.no_grad()
def draft_everywhere(
    drafter: Drafter, texts: list[GreedyText], features: list[torch.Tensor], K: int, budget: float = 2.5e7
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The drafter's greedy K-token block at every answer position of every text: (tokens, log-probs) [A, K].

    Anchors go through `draft_blocks` in chunks sized so that one chunk's attention scores (texts x heads x
    anchors x block x context) stay near `budget` elements."""
    dev = drafter.embed_weight.device
    was = drafter.training
    drafter.eval()
    try:
        lens = [len(t.tokens) for t in texts]
        S = max(lens)
        tokens = torch.zeros(len(texts), S, dtype=torch.long, device=dev)
        for i, t in enumerate(texts):
            tokens[i, : lens[i]] = torch.tensor(t.tokens, device=dev)
        feats = _pad(features, S, dev, drafter._dtype())
        lengths = torch.tensor(lens, device=dev)
        spans = [np.arange(t.prompt_len, t.end) for t in texts]
        chunk = max(8, int(budget / (len(texts) * drafter.spec.num_heads * (K + 1) * S)))
        outs_t = [[] for _ in texts]
        outs_l = [[] for _ in texts]
        A = max(s.size for s in spans)
        for c in range(0, A, chunk):
            part = [s[c : c + chunk] for s in spans]
            M = max(p.size for p in part)
            if M == 0:
                continue
            anc = torch.zeros(len(texts), M, dtype=torch.long, device=dev)
            for i, p in enumerate(part):
                anc[i, : p.size] = torch.as_tensor(p, device=dev)
            ids, lp, _ = drafter.draft_blocks(tokens, feats, lengths, anc, K, 0.0, None)
            ids, lp = ids.cpu().numpy(), lp.float().cpu().numpy()
            for i, p in enumerate(part):
                outs_t[i].append(ids[i, : p.size])
                outs_l[i].append(lp[i, : p.size])
        K0 = np.zeros((0, K))
        return [
            (np.concatenate(t or [K0.astype(np.int64)]).astype(np.int64), np.concatenate(lp or [K0]).astype(np.float32))
            for t, lp in zip(outs_t, outs_l)
        ]
    finally:
        drafter.train(was)


def walk(text: GreedyText, blocks: np.ndarray, logprobs: np.ndarray) -> Segmentation:
    """Greedy verification along the text, given the drafter's block at every answer position."""
    toks = np.asarray(text.tokens, dtype=np.int64)
    P, end = text.prompt_len, text.end
    K = blocks.shape[1]
    if toks.size < end + K - 1:
        raise ValueError(f"text has {toks.size - end} lookahead tokens; block size {K} needs {K - 1}")
    win = np.lib.stride_tricks.sliding_window_view(toks[P:], K)[: end - P]  # [A, K] the text after each position
    known = text.known_len  # past it the text is padding: no draft there is accepted
    match_all = (blocks == win) & (np.arange(P, end)[:, None] + np.arange(K)[None, :] < known)
    everywhere = np.where(match_all.all(1), K, match_all.argmin(1))
    anchors, acc, com = [], [], []
    n = P
    while n < end:
        d = blocks[n - P]
        match = (d == toks[n : n + K]) & (np.arange(n, n + K) < known)
        a = int(match.argmin()) if not match.all() else K
        anchors.append(n)
        acc.append(a)
        c = min(a + 1, end - n)
        com.append(c)
        n += c
    idx = np.asarray(anchors, dtype=np.int64) - P
    return Segmentation(
        anchors=np.asarray(anchors, dtype=np.int64), draft_tokens=blocks[idx], draft_logprobs=logprobs[idx],
        accepted=np.asarray(acc, dtype=np.int64), committed=np.asarray(com, dtype=np.int64), everywhere=everywhere,
    )  # fmt: skip


def segment(
    drafter: Drafter,
    texts: list[GreedyText],
    features: list[torch.Tensor],
    K: int,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> list[Segmentation]:
    """Every text's greedy speculative steps under this drafter (drafter forwards only, no target), drafting in
    `dtype` (the target's, as the engine drafts; None = the drafter's own)."""
    if dtype is not None:
        drafter = drafter.for_inference(dtype)
    out: list[Segmentation] = []
    for c in range(0, len(texts), batch_size):
        tx, ft = texts[c : c + batch_size], features[c : c + batch_size]
        for t, (b, lp) in zip(tx, draft_everywhere(drafter, tx, ft, K)):
            out.append(walk(t, b, lp))
    return out


def stats_of(segs: list[Segmentation], K: int, new_tokens: int, wall_s: float) -> EngineStats:
    """The engine's tau / alpha bookkeeping over re-segmented steps."""
    acc = np.concatenate([s.accepted for s in segs]) if segs else np.zeros(0, dtype=np.int64)
    hist = np.bincount(acc, minlength=K + 1).tolist()
    return EngineStats(num_steps=int(acc.size), accepted_hist=hist, new_tokens=new_tokens, wall_s=wall_s)
