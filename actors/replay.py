"""Extra replay blocks (an ablation; the official [docs/recipes.md R2] recipe drafts nothing a second time).

For each chosen anchor the current drafter drafts R blocks of K tokens, conditioned on the true target features of
that prefix, exactly as it would at inference; the target scores every block of a sequence in ONE tree-masked
forward (`actors/scoring.py`). Anchor policies (`replay.extra`): `error` (the committed prefix just before each
rejected draft token, dopd's first-wave mechanism), `random` (as many anchors, uniformly over the answer), `all`
(every answer position), `none`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dopd.common.config import ReplayConfig, RolloutConfig
from dopd.common.drafters import Drafter
from dopd.common.models import Target
from dopd.common.record import SOURCE_REPLAY, STREAM_BOTH, Blocks
from dopd.common.sampling import processed_probs

from .rollout import Rolled, error_positions
from .scoring import score_branches


@dataclass
class ReplayStats:
    anchors: int = 0
    blocks: int = 0
    tokens_scored: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0


def choose_anchors(seq: Rolled, policy: str, min_anchor: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Prefix lengths to replay from, sorted; always inside the answer and at least `min_anchor`."""
    n = len(seq.tokens)
    lo = max(seq.prompt_len, min_anchor)
    span = np.arange(lo, n, dtype=np.int64)
    if policy == "none" or span.size == 0:
        return np.zeros(0, dtype=np.int64)
    if policy == "error":
        a = error_positions(seq)
        a = a[a >= lo]
    elif policy == "random":
        count = min(int((error_positions(seq) >= lo).sum()), span.size)
        a = rng.choice(span, size=count, replace=False)
    elif policy == "all":
        a = span
    else:
        raise ValueError(f"unknown anchor policy '{policy}'")
    if a.size > cap:
        a = rng.choice(a, size=cap, replace=False)
    return np.sort(a)


class Replayer:
    """Drafts blocks from anchors with a drafter and has the target score them (one tree forward per batch)."""

    def __init__(self, target: Target, cfg: ReplayConfig, rollout_cfg: RolloutConfig, batch_size: int = 4):
        self.target = target
        self.cfg = cfg
        self.rollout_cfg = rollout_cfg
        self.batch_size = batch_size

    @torch.no_grad()
    def replay(
        self, drafter: Drafter, seqs: list[Rolled], anchors: list[np.ndarray], seed: int
    ) -> tuple[list[Blocks], ReplayStats]:
        K, R, topk = self.rollout_cfg.block_size, self.cfg.num_blocks, self.rollout_cfg.topk
        stats = ReplayStats()
        out: list[Blocks] = [Blocks.empty(K, topk) for _ in seqs]
        gen = torch.Generator(device=self.target.device).manual_seed(seed)
        order = [i for i in range(len(seqs)) if anchors[i].size]
        was = drafter.training
        drafter.eval()
        try:
            for c in range(0, len(order), self.batch_size):
                idx = order[c : c + self.batch_size]
                t0 = time.perf_counter()
                chunk = self._draft(drafter, [seqs[i] for i in idx], [np.repeat(anchors[i], R) for i in idx], K, gen)
                t1 = time.perf_counter()
                blocks = self._score(chunk, K, topk, gen)
                t2 = time.perf_counter()
                stats.draft_s += t1 - t0
                stats.target_s += t2 - t1
                for j, i in enumerate(idx):
                    out[i] = blocks[j]
                    stats.anchors += int(anchors[i].size)
                    stats.blocks += len(blocks[j])
                stats.tokens_scored += chunk["scored"]
        finally:
            drafter.train(was)
        return out, stats

    def _draft(self, drafter: Drafter, seqs: list[Rolled], anchors: list[np.ndarray], K: int, gen) -> dict:
        dev = self.target.device
        lens = [len(s.tokens) for s in seqs]
        S = max(lens)
        tokens = torch.zeros(len(seqs), S, dtype=torch.long, device=dev)
        feats = torch.zeros(len(seqs), S, seqs[0].features.shape[1], device=dev)
        for i, s in enumerate(seqs):
            tokens[i, : lens[i]] = torch.tensor(s.tokens, device=dev)
            f = s.features[: lens[i] - 1]
            feats[i, : f.shape[0]] = f.to(dev, torch.float32)
        M = max(a.size for a in anchors)
        anc = torch.zeros(len(seqs), M, dtype=torch.long, device=dev)
        for i, a in enumerate(anchors):
            anc[i, : a.size] = torch.as_tensor(a, device=dev)
        ids, lp, q_tok = drafter.draft_blocks(
            tokens, feats, torch.tensor(lens, device=dev), anc, K, self.cfg.temperature, gen
        )
        return dict(seqs=seqs, anchors=anchors, ids=ids, lp=lp, q=q_tok, scored=0)

    def _score(self, ch: dict, K: int, topk: int, gen) -> list[Blocks]:
        """Branch (a, d_1..d_{K-1}) per block; position 1 is read at the prefix's last row, j+1 after d_j."""
        seqs, anchors, ids = ch["seqs"], ch["anchors"], ch["ids"]
        branches = [[(int(a), ids[i, m, : K - 1].tolist()) for m, a in enumerate(anchors[i])] for i in range(len(seqs))]
        seq_h, br_h = score_branches(self.target, [s.tokens for s in seqs], branches)
        ch["scored"] = sum(len(s.tokens) + anchors[i].size * (K - 1) for i, s in enumerate(seqs))
        head = self.target.lm_head
        greedy = self.rollout_cfg.temperature <= 0
        dev = self.target.device
        out = []
        for i in range(len(seqs)):
            a = torch.as_tensor(anchors[i], device=dev)
            M = a.numel()
            h = torch.stack(
                [torch.cat([seq_h[i][int(x) - 1 : int(x)], br_h[i][m]], 0) for m, x in enumerate(anchors[i])]
            )  # [M,K,H]
            logits = head(h).float()
            lsm = torch.log_softmax(logits, -1)
            d = ids[i, :M]
            tk = lsm.topk(topk, dim=-1)
            tk_p = tk.values.exp()
            p_d = lsm.gather(-1, d[..., None]).squeeze(-1).exp()
            if greedy:
                ok = d == logits.argmax(-1)
            else:
                pp = (
                    processed_probs(logits, self.rollout_cfg.temperature, self.rollout_cfg.top_p)
                    .gather(-1, d[..., None])
                    .squeeze(-1)
                )
                u = torch.rand(pp.shape, generator=gen, device=dev)
                ok = u * ch["q"][i, :M] < pp
            accept = ok.long().cumprod(-1).bool()
            out.append(
                Blocks(
                    anchor=a.cpu().numpy().astype(np.int32),
                    draft_tokens=d.cpu().numpy().astype(np.int32),
                    draft_logprobs=ch["lp"][i, :M].float().cpu().numpy(),
                    target_topk_ids=tk.indices.cpu().numpy().astype(np.int32),
                    target_topk_probs=tk_p.cpu().numpy(),
                    target_tail=(1 - tk_p.sum(-1)).clamp_min(0).cpu().numpy(),
                    target_draft_prob=p_d.cpu().numpy(),
                    accept_mask=accept.cpu().numpy(),
                    source=np.full(M, SOURCE_REPLAY, dtype=np.uint8),
                    streams=np.full(M, STREAM_BOTH, dtype=np.uint8),
                )
            )
        return out
