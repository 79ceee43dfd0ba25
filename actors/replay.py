"""Error-position replay: the current drafter drafts again from where verification rejected it.

For each anchor (by default the committed prefix just before a rejected draft token) the drafter drafts R blocks
of K tokens, conditioned on the true target features of that prefix, exactly as it would at inference. The target
then scores every block of a sequence in ONE forward: the sequence and all its blocks are laid out side by side,
each block token attending to its anchor's prefix and to its own block's earlier tokens (a tree mask), so the
target's distribution at every block position costs one batched pass, not one pass per block.

Anchor policies: `error` (Draft-OPD), `random` (the paper's ablation: as many anchors as errors, uniformly over
the answer), `all` (every answer position), `none`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dopd.common.config import ReplayConfig, RolloutConfig
from dopd.common.drafters import Drafter
from dopd.common.models import Target
from dopd.common.record import SOURCE_REPLAY, Blocks
from dopd.common.sampling import processed_probs
from dopd.common.specdec import SeqResult

from .rollout import error_positions


@dataclass
class ReplayStats:
    anchors: int = 0
    blocks: int = 0
    tokens_scored: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0


def choose_anchors(seq: SeqResult, policy: str, min_anchor: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Prefix lengths to replay from, sorted; always inside the answer and at least `min_anchor`."""
    n = len(seq.prompt_ids) + len(seq.output_ids)
    lo = max(len(seq.prompt_ids), min_anchor)
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


def _pad_features(seqs: list[SeqResult], S: int, dev, dtype) -> torch.Tensor:
    F = seqs[0].features.shape[1]
    out = torch.zeros(len(seqs), S, F, device=dev, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : s.features.shape[0]] = s.features.to(dev, dtype)
    return out


class Replayer:
    """Drafts blocks from anchors with a drafter and has the target score them (one tree forward per batch)."""

    def __init__(self, target: Target, cfg: ReplayConfig, rollout_cfg: RolloutConfig, batch_size: int = 4):
        self.target = target
        self.cfg = cfg
        self.rollout_cfg = rollout_cfg
        self.batch_size = batch_size

    @torch.no_grad()
    def replay(
        self, drafter: Drafter, seqs: list[SeqResult], anchors: list[np.ndarray], seed: int
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

    def _draft(self, drafter: Drafter, seqs: list[SeqResult], anchors: list[np.ndarray], K: int, gen) -> dict:
        dev = self.target.device
        lens = [len(s.prompt_ids) + len(s.output_ids) for s in seqs]
        S = max(lens)
        M = max(a.size for a in anchors)
        tokens = torch.zeros(len(seqs), S, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):
            tokens[i, : lens[i]] = torch.tensor(s.prompt_ids + s.output_ids, device=dev)
        feats = _pad_features(seqs, S, dev, torch.float32)
        anc = torch.zeros(len(seqs), M, dtype=torch.long, device=dev)
        for i, a in enumerate(anchors):
            anc[i, : a.size] = torch.as_tensor(a, device=dev)
        lengths = torch.tensor(lens, device=dev)
        ids, lp, q_tok = drafter.draft_blocks(tokens, feats, lengths, anc, K, self.cfg.temperature, gen)
        return dict(tokens=tokens, lengths=lens, anchors=anchors, anc=anc, ids=ids, lp=lp, q=q_tok, scored=0)

    def _score(self, ch: dict, K: int, topk: int, gen) -> list[Blocks]:
        """One target forward over [sequence | block tokens] per row with a tree mask; top-k at every block position."""
        dev = self.target.device
        tokens, lens, anchors, ids = ch["tokens"], ch["lengths"], ch["anchors"], ch["ids"]
        b = tokens.shape[0]
        J = K - 1  # block tokens fed as inputs (d_1..d_{K-1}); position 1 is scored at the prefix's last token
        L = [n + a.size * J for n, a in zip(lens, anchors)]
        Lmax = max(L)
        inp = torch.zeros(b, Lmax, dtype=torch.long, device=dev)
        pos = torch.zeros(b, Lmax, dtype=torch.long, device=dev)
        mask = torch.zeros(b, Lmax, Lmax, dtype=torch.bool, device=dev)
        ar = torch.arange(Lmax, device=dev)
        for i in range(b):
            n, a = lens[i], torch.as_tensor(anchors[i], device=dev)
            M = a.numel()
            inp[i, :n] = tokens[i, :n]
            pos[i, :n] = torch.arange(n, device=dev)
            mask[i, :n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
            if J > 0 and M:
                inp[i, n : L[i]] = ids[i, :M, :J].reshape(-1)
                jj = torch.arange(J, device=dev)
                pos[i, n : L[i]] = (a[:, None] + jj[None, :]).reshape(-1)
                q_blk = torch.arange(M, device=dev).repeat_interleave(J)  # block of each query
                q_j = jj.repeat(M)
                rows = n + torch.arange(M * J, device=dev)
                see_prefix = ar[None, :n] < a[q_blk][:, None]  # [MJ, n]
                mask[i, rows[:, None], ar[None, :n]] = see_prefix
                k_blk, k_j = q_blk, q_j
                own = (q_blk[:, None] == k_blk[None, :]) & (k_j[None, :] <= q_j[:, None])
                mask[i, rows[:, None], rows[None, :]] = own
            mask[i, L[i] :, L[i] :] = torch.eye(Lmax - L[i], dtype=torch.bool, device=dev)
        hidden = self.target.model.model(input_ids=inp, attention_mask=mask[:, None], position_ids=pos, use_cache=False).last_hidden_state
        ch["scored"] = sum(L)
        head = self.target.lm_head
        greedy = self.rollout_cfg.temperature <= 0
        out = []
        for i in range(b):
            n, a = lens[i], torch.as_tensor(anchors[i], device=dev)
            M = a.numel()
            rows = [a - 1] + [n + torch.arange(M, device=dev) * J + j for j in range(J)]
            h = hidden[i, torch.stack(rows, 1)]  # [M, K, H]
            logits = head(h).float()
            lsm = torch.log_softmax(logits, -1)
            d = ids[i, :M]
            tk = lsm.topk(topk, dim=-1)
            tk_p = tk.values.exp()
            p_d = lsm.gather(-1, d[..., None]).squeeze(-1).exp()
            if greedy:
                ok = d == logits.argmax(-1)
            else:
                pp = processed_probs(logits, self.rollout_cfg.temperature, self.rollout_cfg.top_p).gather(-1, d[..., None]).squeeze(-1)
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
                )
            )
        return out
