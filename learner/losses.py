"""Acceptance-aware distillation (Draft-OPD) and the SFT objectives, as pure functions of tensors.

Every block position carries the target's top-k distribution (ids, probs) plus its tail mass, the drafted token d
with the target's p(d), and whether verification accepted it. Against the drafter's log-distribution log q:

- accepted positions: a divergence between the target's (top-k + tail bucket) distribution and q collapsed onto
  the same buckets (forward KL by default; TV as in Bebop, JSD, or Bernoulli on the drafted token); with
  `acc_at_first_rejection` (default, as the official code) also the first rejected position, whose target
  distribution is conditioned on a correct prefix: pull the target's choice up there while the rejected stream
  pushes the drafter's wrong token down;
- rejected positions (the first rejection to the block end): a divergence on the drafted token (k3 sampled
  reverse-KL estimator by default; Bernoulli forward KL; or the top-k divergences), weighted gamma^(offset-1);
  offset 1 is the first rejected position (`gamma_offset="rejection"`) or the block's first draft (`"block"`, as
  the official Draft-OPD code counts).
- L = (lambda_acc * sum L_acc + lambda_rej * sum w * L_rej) / (lambda_acc * N_acc + lambda_rej * sum w), the joint
  token mean of the official implementation, so a batch with few rejections is not up-weighted.

Target ids outside a reduced draft vocabulary cannot be produced by the drafter: their mass joins the tail bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dopd.common.config import LossConfig

EPS = 1e-8
LOG_CLAMP = 20.0
K3_LOG_FLOOR = 10.0


@dataclass
class BlockTargets:
    """Targets for B x M blocks of K positions (all tensors [B, M, K, ...])."""

    topk_ids: torch.Tensor  # [B,M,K,k] target ids
    topk_probs: torch.Tensor  # [B,M,K,k]
    tail: torch.Tensor  # [B,M,K]
    draft_tokens: torch.Tensor  # [B,M,K] target ids (for SFT: the true tokens)
    p_draft: torch.Tensor  # [B,M,K] target p(d)
    accept: torch.Tensor  # [B,M,K] bool
    valid: torch.Tensor  # [B,M,K] bool (padding blocks / positions False)

    def to(self, device) -> BlockTargets:
        return BlockTargets(**{k: v.to(device) for k, v in self.__dict__.items()})


def _bucket_q(logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets):
    """q and p on the buckets (top-k ids in the draft vocabulary) + tail. Returns (p_b, q_b, logq_b, p_tail, q_tail)."""
    didx = t2d[T.topk_ids]  # [...,k] draft index or -1
    inv = didx >= 0
    logq_b = logq.gather(-1, didx.clamp_min(0)).masked_fill(~inv, float("-inf"))
    q_b = logq_b.exp()
    p_b = T.topk_probs.float() * inv
    p_tail = (T.tail.float() + (T.topk_probs.float() * ~inv).sum(-1)).clamp(0, 1)
    q_tail = (1 - q_b.sum(-1)).clamp_min(EPS)
    return p_b, q_b, logq_b, p_tail, q_tail


def _xlogy_div(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), 0 where p == 0 (and no inf*0 NaNs)."""
    pos = p > 0
    return torch.where(pos, p * (logp - logq.clamp_min(-LOG_CLAMP * 5)), torch.zeros_like(p))


def bucket_divergence(kind: str, logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets) -> torch.Tensor:
    """Per-position divergence between target and drafter on the top-k + tail buckets: fkl | tv | jsd."""
    p_b, q_b, logq_b, p_tail, q_tail = _bucket_q(logq, t2d, T)
    if kind == "fkl":
        lp_b = torch.log(p_b.clamp_min(EPS))
        kl = _xlogy_div(p_b, lp_b, logq_b).sum(-1)
        return kl + _xlogy_div(p_tail, torch.log(p_tail.clamp_min(EPS)), torch.log(q_tail))
    if kind == "tv":
        return 0.5 * ((p_b - q_b).abs().sum(-1) + (p_tail - q_tail).abs())
    if kind == "jsd":
        P = torch.cat([p_b, p_tail[..., None]], -1)
        Q = torch.cat([q_b, q_tail[..., None]], -1)
        Mx = 0.5 * (P + Q)
        lm = torch.log(Mx.clamp_min(EPS))
        kl_pm = _xlogy_div(P, torch.log(P.clamp_min(EPS)), lm).sum(-1)
        kl_qm = _xlogy_div(Q, torch.log(Q.clamp_min(EPS)), lm).sum(-1)
        return 0.5 * (kl_pm + kl_qm)
    raise ValueError(f"unknown bucket divergence '{kind}'")


def token_divergence(kind: str, logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets) -> torch.Tensor:
    """Per-position divergence on the drafted token d: k3 (sampled reverse KL) | bernoulli (forward KL)."""
    didx = t2d[T.draft_tokens]
    inv = didx >= 0
    lq = logq.gather(-1, didx.clamp_min(0)[..., None]).squeeze(-1).masked_fill(~inv, -LOG_CLAMP)
    lq = lq.clamp(-LOG_CLAMP, 0)
    p = T.p_draft.float().clamp(0, 1)
    lp = torch.log(p.clamp_min(EPS)).clamp_min(-LOG_CLAMP)
    if kind == "k3":
        # log(p/q) at d ~ q, with both log-probs floored at -10 as in the official code; the estimator itself is
        # not clamped, so the most wrong tokens (p(d) ~ 0) keep a gradient pushing q(d) down
        r = lp.clamp_min(-K3_LOG_FLOOR) - lq.clamp_min(-K3_LOG_FLOOR)
        return torch.exp(r) - 1 - r
    if kind == "bernoulli":
        q = lq.exp().clamp(EPS, 1 - 1e-6)
        pc = p.clamp(0, 1 - 1e-6)
        return _xlogy_div(pc, lp, torch.log(q)) + _xlogy_div(1 - pc, torch.log1p(-pc), torch.log1p(-q))
    raise ValueError(f"unknown token divergence '{kind}'")


def divergence(kind: str, logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets) -> torch.Tensor:
    if kind in ("k3", "bernoulli"):
        return token_divergence(kind, logq, t2d, T)
    return bucket_divergence(kind, logq, t2d, T)


def rejection_weights(accept: torch.Tensor, valid: torch.Tensor, gamma: float, offset_from: str) -> torch.Tensor:
    """gamma^(offset-1) on rejected positions (first rejection .. block end), 0 elsewhere."""
    K = accept.shape[-1]
    j = torch.arange(1, K + 1, device=accept.device).expand_as(accept)  # 1-based block position
    n_acc = (accept & valid).long().cumprod(-1).sum(-1, keepdim=True)  # accepted prefix length
    rejected = valid & (j > n_acc)
    offset = j - n_acc if offset_from == "rejection" else j
    w = torch.pow(torch.full_like(accept, gamma, dtype=torch.float32), (offset - 1).clamp_min(0).float())
    return w * rejected


@dataclass
class LossParts:
    loss: torch.Tensor
    acc: float  # mean accepted-stream divergence
    rej: float  # weighted mean rejected-stream divergence
    n_acc: int
    n_rej: int
    w_rej: float


def first_rejection(accept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """True at each block's first rejected position (none for fully accepted blocks)."""
    K = accept.shape[-1]
    j = torch.arange(K, device=accept.device).expand_as(accept)
    n_acc = (accept & valid).long().cumprod(-1).sum(-1, keepdim=True)
    return valid & (j == n_acc)


def opd_masks(T: BlockTargets, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted-stream mask and the rejected-stream weights gamma^(offset-1) of a batch."""
    acc_mask = T.accept & T.valid
    if cfg.acc_at_first_rejection:
        acc_mask = acc_mask | first_rejection(T.accept, T.valid)
    return acc_mask, rejection_weights(T.accept, T.valid, cfg.gamma, cfg.gamma_offset)


def loss_denominator(T: BlockTargets, cfg: LossConfig, mode: str, step_weight: torch.Tensor | None = None) -> float:
    """The token weight a batch's loss is divided by; needs no forward, so ranks can all-reduce it first."""
    if mode == "opd":
        acc_mask, w_rej = opd_masks(T, cfg)
        return _opd_weight(cfg, int(acc_mask.sum()), float(w_rej.sum()))
    if mode == "sft":
        return float((step_weight.to(T.valid.device).expand_as(T.valid) * T.valid).sum())
    raise ValueError(f"unknown loss mode '{mode}'")


def _opd_weight(cfg: LossConfig, n_acc: int, w_rej_sum: float) -> float:
    """The joint token mean's denominator: lambda_acc * N_acc + lambda_rej * sum of rejection weights."""
    return cfg.lambda_acc * n_acc + cfg.lambda_rej * w_rej_sum


def opd_loss(logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, cfg: LossConfig, denom: float | None = None) -> LossParts:
    """The Draft-OPD objective over both streams (logq: draft-vocab log-softmax [B,M,K,Vd]).

    denom: divide by this instead of the batch's own token weight (a learner rank passes the all-reduced weight
    of every rank's batch divided by the world size, so averaged gradients are those of one global token mean).
    """
    acc_mask, w_rej = opd_masks(T, cfg)
    zero = logq.sum() * 0.0
    l_acc = divergence(cfg.acc_divergence, logq, t2d, T) if bool(acc_mask.any()) else None
    l_rej = divergence(cfg.rej_divergence, logq, t2d, T) if bool((w_rej > 0).any()) else None
    s_acc = (l_acc * acc_mask).sum() if l_acc is not None else zero
    s_rej = (l_rej * w_rej).sum() if l_rej is not None else zero
    n_acc = int(acc_mask.sum())
    w_sum = float(w_rej.sum())
    if denom is None:
        denom = _opd_weight(cfg, n_acc, w_sum)
    loss = (cfg.lambda_acc * s_acc + cfg.lambda_rej * s_rej) / max(denom, EPS)
    return LossParts(
        loss=loss,
        acc=float(s_acc.detach()) / max(n_acc, 1),
        rej=float(s_rej.detach()) / max(w_sum, EPS),
        n_acc=n_acc,
        n_rej=int((w_rej > 0).sum()),
        w_rej=w_sum,
    )


def sft_loss(
    logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, step_weight: torch.Tensor, objective: str, denom: float | None = None
) -> LossParts:
    """Supervised objective on teacher-forced blocks: fkl to the target top-k, CE to the true token, or both.

    step_weight [K] weights block position j (EAGLE-3 TTT: 0.8^(j-1); DFlash: exp(-(j-1)/decay)); the loss is the
    weighted mean over valid positions.
    """
    w = step_weight.to(logq.device).expand_as(T.valid) * T.valid
    parts = []
    if objective in ("kl", "both"):
        parts.append(bucket_divergence("fkl", logq, t2d, T))
    if objective in ("ce", "both"):
        didx = t2d[T.draft_tokens]
        lq = logq.gather(-1, didx.clamp_min(0)[..., None]).squeeze(-1)
        parts.append(torch.where(didx >= 0, -lq.clamp_min(-LOG_CLAMP * 5), torch.full_like(lq, LOG_CLAMP)))
    per = sum(parts)
    loss = (per * w).sum() / (w.sum().clamp_min(EPS) if denom is None else max(denom, EPS))
    n = int(T.valid.sum())
    return LossParts(loss=loss, acc=float(loss.detach()), rej=0.0, n_acc=n, n_rej=0, w_rej=0.0)
