"""Acceptance-aware distillation (Draft-OPD) and the SFT objectives, as pure functions of tensors.

Every block position carries the target's top-k distribution (ids, probs) plus its tail mass, the drafted token d
with the target's p(d), and whether verification accepted it; each block says which loss streams it feeds
(`record.STREAM_ACC`, `STREAM_REJ`). Against the drafter's log-distribution log q:

- accepted stream (blocks flagged STREAM_ACC): the accepted positions and, with `acc_at_first_rejection` (official [docs/recipes.md R3]),
  the first rejected position, labelled by the target: a divergence between the target's (top-k + tail bucket)
  distribution and q on the same buckets (forward KL, TV as in Bebop, JSD), or `bernoulli` = Bernoulli forward KL
  on the target's top-1 token (the official [docs/recipes.md R4] DFlash recipe);
- rejected stream (blocks flagged STREAM_REJ): the drafted tokens from the first rejection to the block end, a
  divergence on the drafted token (k3 = the sampled reverse-KL estimator exp(r) - 1 - r, r = log p(d) - log q(d),
  with verl's clips (`k3_verl`, the official [docs/recipes.md R5] form) or on log-probs floored at -10 (`k3_floored`, dopd-2511); or
  Bernoulli forward KL), weighted gamma^(offset-1) (or only the first rejected token, `rej_first_only`), offset
  counted from the block's first draft (`gamma_offset="block"`, official [docs/recipes.md R3]) or from the first rejection;
- each position's loss is clamped at `clamp` (official [docs/recipes.md R6]: 10), then
  L = (lambda_acc * sum L_acc + lambda_rej * sum w * L_rej) / (lambda_acc * N_acc + lambda_rej * sum w),
  the joint token mean of the official [docs/recipes.md R3] implementation, so a batch with few rejections is not up-weighted (the
  objective sets N_acc: every response token, officially [docs/recipes.md R3], or the supervised positions);
- exact full-vocabulary targets (`full_soft_ce`, `full_tv`) from the target's final hidden state the records
  carry, through the frozen head (`loss.targets=full`).
- the EAGLE-3 recipe's accepted stream is the training-time test over every response position instead (`sft_sums`
  on teacher-forced blocks, 0.8^step), joining the same joint mean.

Target ids outside a reduced draft vocabulary cannot be produced by the drafter: their mass joins the tail bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dopd.common.config import DVIConfig, LossConfig

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
    acc_block: torch.Tensor | None = None  # [B,M] bool: the block feeds the accepted stream (None = all do)
    rej_block: torch.Tensor | None = None  # [B,M] bool: the block feeds the rejected stream (None = all do)
    # the target's final normed hidden state on its own text at the row predicting each block position (exact
    # full-vocabulary targets: the learner applies the frozen head), where the record carries it
    hidden: torch.Tensor | None = None  # [B,M,K,H]
    hidden_ok: torch.Tensor | None = None  # [B,M,K] bool
    rollout_block: torch.Tensor | None = None  # [B,M] bool: a verification step of the rollout (not shuffled/replayed)

    def to(self, device) -> BlockTargets:
        return BlockTargets(**{k: (v.to(device) if v is not None else None) for k, v in self.__dict__.items()})


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


K3_DELTA_CLIP = 20.0  # verl's kl_penalty: delta = clip(log p - log q, -20, 20)
K3_VALUE_CLIP = 10.0  # ... then k3 = clip(e^delta - delta - 1, -10, 10)
LOG1M_EPS = math.log1p(-torch.finfo(torch.float32).eps)  # the Bernoulli KL's upper log-prob clamp (log(1 - eps))


def _token_logprobs(
    logq: torch.Tensor, t2d: torch.Tensor, tokens: torch.Tensor, p_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(token), log p(token)) per position, unfloored: a token outside the draft vocabulary has log q = -100
    (q = 0 up to float32), a zero recorded p has log p = log(float32 tiny) (its k3 is clipped either way)."""
    didx = t2d[tokens]
    lq = logq.gather(-1, didx.clamp_min(0)[..., None]).squeeze(-1).masked_fill(didx < 0, -5 * LOG_CLAMP)
    lp = torch.log(p_tokens.float().clamp(torch.finfo(torch.float32).tiny, 1.0))
    return lq, lp


def k3_verl(lq: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """verl's kl_penalty "k3"/"low_var_kl" (verl/trainer/ppo/core_algos.py @68227b907, `kl_penalty_forward`):
    delta = clip(log p - log q, -20, 20), k3 = clip(e^delta - delta - 1, -10, 10). Its gradient in log q is
    1 - e^delta inside the clips and exactly 0 where a clip binds: delta < -10.99998 (a confidently wrong draft)
    or delta > 2.61087."""
    delta = (lp - lq).clamp(-K3_DELTA_CLIP, K3_DELTA_CLIP)
    return (torch.exp(delta) - delta - 1).clamp(-K3_VALUE_CLIP, K3_VALUE_CLIP)


def k3_floored(lq: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """dopd-2511's k3: both log-probs floored at -10 first (r = max(log p, -10) - max(log q, -10) >= -10, so k3 <= 9
    and every rejected token with log q > -10 is pushed down with a gradient of about 1)."""
    r = lp.clamp_min(-K3_LOG_FLOOR) - lq.clamp(-LOG_CLAMP, 0).clamp_min(-K3_LOG_FLOOR)
    return torch.exp(r) - 1 - r


def bernoulli_fkl(lq: torch.Tensor, lp: torch.Tensor, floor: float) -> torch.Tensor:
    """Bernoulli forward KL on one token, as the official [docs/recipes.md R4] `_local_bernoulli_forward_kl` (losses.py @69b03da): both
    log-probs clamped to [floor, log(1 - eps)] in fp32, then p (log p - log q) + (1-p) (log(1-p) - log(1-q)).
    A drafter log q below the floor gets no gradient (a dead zone, not a bound)."""
    ls = lq.float().clamp_min(floor).clamp(max=LOG1M_EPS)
    lt = lp.float().clamp_min(floor).clamp(max=LOG1M_EPS)
    p, q = lt.exp(), ls.exp()
    return p * (lt - ls) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))


def token_divergence(
    kind: str,
    logq: torch.Tensor,
    t2d: torch.Tensor,
    tokens: torch.Tensor,
    p_tokens: torch.Tensor,
    k3: str = "verl",
    floor: float = -K3_LOG_FLOOR,
) -> torch.Tensor:
    """Per-position divergence on one token per position (its target probability p): k3 (`k3`: "verl" or
    "floored") | bernoulli (log-probs floored at `floor`)."""
    lq, lp = _token_logprobs(logq, t2d, tokens, p_tokens)
    if kind == "k3":
        return k3_verl(lq, lp) if k3 == "verl" else k3_floored(lq, lp)
    if kind == "bernoulli":
        return bernoulli_fkl(lq, lp, floor)
    raise ValueError(f"unknown token divergence '{kind}'")


def token_silenced(
    kind: str,
    logq: torch.Tensor,
    t2d: torch.Tensor,
    tokens: torch.Tensor,
    p_tokens: torch.Tensor,
    k3: str,
    floor: float,
    clamp: float | None,
) -> torch.Tensor:
    """[...] bool: where a clip, floor or the loss clamp makes the token's gradient in log q exactly zero (the
    official [docs/recipes.md R6] metrics' `loss_clamp_fraction`, plus the floors that silence without clamping the value)."""
    with torch.no_grad():
        lq, lp = _token_logprobs(logq, t2d, tokens, p_tokens)
        if kind == "k3" and k3 == "verl":
            delta = lp - lq
            raw = torch.exp(delta.clamp(-K3_DELTA_CLIP, K3_DELTA_CLIP)) - delta.clamp(-K3_DELTA_CLIP, K3_DELTA_CLIP) - 1
            out = (delta.abs() > K3_DELTA_CLIP) | (raw > K3_VALUE_CLIP)
            value = raw.clamp(max=K3_VALUE_CLIP)
        elif kind == "k3":
            out = lq < -K3_LOG_FLOOR
            value = k3_floored(lq, lp)
        elif kind == "bernoulli":
            out = (lq < floor) | (lq > LOG1M_EPS)
            value = bernoulli_fkl(lq, lp, floor)
        else:
            return torch.zeros_like(lq, dtype=torch.bool)
        return out | (value > clamp) if clamp is not None else out


def token_args(cfg: LossConfig) -> dict:
    """The loss settings `token_divergence` reads."""
    return {"k3": cfg.k3, "floor": cfg.log_floor}


def acc_divergence(kind: str, logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, **tok) -> torch.Tensor:
    """The accepted stream's divergence: on the buckets, or Bernoulli on the target's top-1 token."""
    if kind == "bernoulli":
        return token_divergence("bernoulli", logq, t2d, T.topk_ids[..., 0], T.topk_probs[..., 0], **tok)
    return bucket_divergence(kind, logq, t2d, T)


def rej_divergence(kind: str, logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, **tok) -> torch.Tensor:
    """The rejected stream's divergence: on the drafted token (k3, bernoulli), or on the buckets."""
    if kind in ("k3", "bernoulli"):
        return token_divergence(kind, logq, t2d, T.draft_tokens, T.p_draft, **tok)
    return bucket_divergence(kind, logq, t2d, T)


def first_rejection(accept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """True at each block's first rejected position (none for fully accepted blocks)."""
    K = accept.shape[-1]
    j = torch.arange(K, device=accept.device).expand_as(accept)
    n_acc = (accept & valid).long().cumprod(-1).sum(-1, keepdim=True)
    return valid & (j == n_acc)


def rejection_weights(accept: torch.Tensor, valid: torch.Tensor, gamma: float, offset_from: str) -> torch.Tensor:
    """gamma^(offset-1) on rejected positions (first rejection .. block end), 0 elsewhere."""
    K = accept.shape[-1]
    j = torch.arange(1, K + 1, device=accept.device).expand_as(accept)  # 1-based block position
    n_acc = (accept & valid).long().cumprod(-1).sum(-1, keepdim=True)  # accepted prefix length
    rejected = valid & (j > n_acc)
    offset = j - n_acc if offset_from == "rejection" else j
    w = torch.pow(torch.full_like(accept, gamma, dtype=torch.float32), (offset - 1).clamp_min(0).float())
    return w * rejected


def opd_masks(T: BlockTargets, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted-stream mask and the rejected-stream weights gamma^(offset-1) of a batch (lambda_rej = 0: none)."""
    acc_mask = T.accept & T.valid
    if cfg.acc_at_first_rejection:
        acc_mask = acc_mask | first_rejection(T.accept, T.valid)
    if T.acc_block is not None:
        acc_mask = acc_mask & T.acc_block[..., None]
    if cfg.rej_first_only:  # the official [docs/recipes.md R11] first-token-only filter: weight 1, no decay
        w = first_rejection(T.accept, T.valid).float()
    else:
        w = rejection_weights(T.accept, T.valid, cfg.gamma, cfg.gamma_offset)
    if T.rej_block is not None:
        w = w * T.rej_block[..., None]
    if not cfg.lambda_rej:
        w = torch.zeros_like(w)
    return acc_mask, w


@dataclass
class StreamSums:
    """Unnormalised stream sums; the joint mean divides them by `weight(cfg)`."""

    acc: torch.Tensor  # sum of accepted-stream (or TTT) losses
    n_acc: float  # its token weight
    rej: torch.Tensor  # sum of gamma-weighted rejected-stream losses
    w_rej: float  # sum of the weights
    n_rej: int = 0  # rejected positions with weight > 0

    def __add__(self, o: StreamSums) -> StreamSums:
        return StreamSums(
            self.acc + o.acc, self.n_acc + o.n_acc, self.rej + o.rej, self.w_rej + o.w_rej, self.n_rej + o.n_rej
        )

    def weight(self, cfg: LossConfig) -> float:
        return cfg.lambda_acc * self.n_acc + (cfg.lambda_rej or 0.0) * self.w_rej


def _clamped(x: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The per-token loss clamp (official [docs/recipes.md R6] `loss_max_clamp`: clamp(min=-c, max=c); the divergences here are >= 0)."""
    return x.clamp(-cfg.clamp, cfg.clamp) if cfg.clamp is not None else x


def block_sums(logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, cfg: LossConfig) -> StreamSums:
    """Both streams over verification blocks (logq: draft-vocab log-softmax [B,M,K,Vd]); cfg: a resolved `Config.loss`."""
    acc_mask, w_rej = opd_masks(T, cfg)
    zero = logq.sum() * 0.0
    tok = token_args(cfg)
    s_acc = (
        (_clamped(acc_divergence(cfg.acc_divergence, logq, t2d, T, **tok), cfg) * acc_mask).sum()
        if bool(acc_mask.any())
        else zero
    )
    s_rej = (
        (_clamped(rej_divergence(cfg.rej_divergence, logq, t2d, T, **tok), cfg) * w_rej).sum()
        if bool((w_rej > 0).any())
        else zero
    )
    return StreamSums(s_acc, float(acc_mask.sum()), s_rej, float(w_rej.sum()), int((w_rej > 0).sum()))


def block_weight(T: BlockTargets, cfg: LossConfig) -> StreamSums:
    """The token weights of `block_sums` without a forward (ranks all-reduce them first)."""
    acc_mask, w_rej = opd_masks(T, cfg)
    z = torch.zeros(())
    return StreamSums(z, float(acc_mask.sum()), z, float(w_rej.sum()), int((w_rej > 0).sum()))


def sft_valid(T: BlockTargets, t2d: torch.Tensor, step_weight: torch.Tensor) -> torch.Tensor:
    """Position weights of a teacher-forced batch: the step weight on valid positions whose target argmax the
    drafter can produce (EAGLE-3 masks positions whose target argmax is outside a reduced draft vocabulary)."""
    w = step_weight.to(T.valid.device).expand_as(T.valid) * T.valid
    return w * (t2d[T.topk_ids[..., 0]] >= 0)


def sft_sums(
    logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, step_weight: torch.Tensor, objective: str
) -> StreamSums:
    """Supervised objective on teacher-forced blocks: fkl to the target top-k, CE to the true token, or both.

    step_weight [K] weights block position j (EAGLE-3 TTT: 0.8^(j-1); DFlash: exp(-(j-1)/decay)).
    """
    w = sft_valid(T, t2d, step_weight)
    per = sft_per_position(logq, t2d, T, objective)
    z = logq.sum() * 0.0
    return StreamSums((per * w).sum(), float(w.sum()), z, 0.0, 0)


def sft_per_position(logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, objective: str) -> torch.Tensor:
    """The supervised loss at every teacher-forced position: fkl to the target top-k, CE to the true token, or both."""
    parts = []
    if objective in ("kl", "both"):
        parts.append(bucket_divergence("fkl", logq, t2d, T))
    if objective in ("ce", "both"):
        didx = t2d[T.draft_tokens]
        lq = logq.gather(-1, didx.clamp_min(0)[..., None]).squeeze(-1)
        parts.append(torch.where(didx >= 0, -lq.clamp_min(-LOG_CLAMP * 5), torch.full_like(lq, LOG_CLAMP)))
    return sum(parts)


@dataclass
class LossParts:
    loss: torch.Tensor
    acc: float  # mean accepted-stream divergence (DVI: the mean per-sample loss; expected_length: -E[accepted])
    rej: float  # weighted mean rejected-stream divergence
    n_acc: int
    n_rej: int
    w_rej: float
    info: dict = field(default_factory=dict)  # the objective's own diagnostics for the step row (DVI: its phase)


# --- DVI (arXiv 2510.05421): online KL, then reward-masked CE + policy gradient -----------------------------------


def dvi_phase(step: int, d: DVIConfig) -> str:
    """ "kl" before `dvi.rl_start_step` (0-based learner step), "rl" from it on."""
    return "rl" if d.rl_start_step is not None and step >= d.rl_start_step else "kl"


def token_logq(logq: torch.Tensor, t2d: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log q(token) per position (a target id outside the draft vocabulary: -LOG_CLAMP)."""
    didx = t2d[tokens]
    lq = logq.gather(-1, didx.clamp_min(0)[..., None]).squeeze(-1)
    return lq.masked_fill(didx < 0, -LOG_CLAMP).clamp_min(-LOG_CLAMP)


def dvi_samples(T: BlockTargets) -> torch.Tensor:
    """DVI's samples: every drafted position up to and including each block's first rejection (accepted-stream blocks)."""
    m = (T.accept & T.valid) | first_rejection(T.accept, T.valid)
    return m & T.acc_block[..., None] if T.acc_block is not None else m


def dvi_sums(
    logq: torch.Tensor,
    t2d: torch.Tensor,
    T: BlockTargets,
    cfg: LossConfig,
    d: DVIConfig,
    step: int,
    sample: torch.Tensor | None = None,
) -> tuple[StreamSums, str]:
    """DVI's per-sample loss summed over the samples (reward r = 1 accepted, 0 at the first rejection).

    kl phase: D(target || q) on the top-k + tail buckets (`cfg.acc_divergence`, forward KL by default).
    rl phase: kl_weight * D + ce_weight * (-r log q(d)) + pg_weight * (-(r - b) log q(d)), b = the mean reward of
    the batch's samples (detached). The policy-gradient term raises log q of an accepted draft (r - b > 0) and
    lowers that of a rejected one (r - b < 0); the baseline leaves its expectation unchanged and its variance lower.
    `sample`: the samples' mask (`dvi_samples`), when the caller has it.
    """
    sample = dvi_samples(T) if sample is None else sample
    phase = dvi_phase(step, d)
    div = _clamped(acc_divergence(cfg.acc_divergence, logq, t2d, T, **token_args(cfg)), cfg)
    if phase == "kl":
        per = div
    else:
        r = T.accept.float()
        n = sample.sum().clamp_min(1)
        b = (r * sample).sum() / n if d.baseline == "batch_mean" else torch.zeros(())
        lq = token_logq(logq, t2d, T.draft_tokens)
        per = d.kl_weight * div + d.ce_weight * _clamped(-r * lq, cfg) - d.pg_weight * (r - b.detach()) * lq
    s = (per * sample).sum() if bool(sample.any()) else logq.sum() * 0.0
    z = logq.sum() * 0.0
    return StreamSums(s, float(sample.sum()), z, 0.0, 0), phase


# --- Bebop (arXiv 2606.12370): the end-to-end expected accepted length under rejection sampling ------------------


def expected_length(tv: torch.Tensor, valid: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """E[accepted drafts] of blocks [..., K] under rejection sampling.

    With a drafted block d_1..d_K (drawn from q, as the rollout drafts), P(d_1..d_j all accepted) =
    E_d[prod_{i<j} min(1, p_i(d_i)/q_i(d_i)) * (1 - TV_j)]: given the path, d_i is accepted with probability
    min(1, p/q), and the last position's acceptance, averaged over its draw, is sum min(p_j, q_j) = 1 - TV_j. So
        E[accepted] = sum_j prod_{i<j} w_i (1 - TV_j),   w_i = `ratio` = min(1, p_i(d_i)/q_i(d_i))   ("path": unbiased)
    and with w_i = 1 - TV_i it is the product form sum_j prod_{i<=j} (1 - TV_i) ("product", ratio=None): exact
    for K = 1 and whenever TV does not depend on the drafted prefix, otherwise an approximation. A position that is
    not valid ends the chain (nothing after it counts).
    """
    return length_terms(tv, valid, ratio).sum(-1)


def length_terms(tv: torch.Tensor, valid: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] the j-th term of `expected_length`: prod_{i<j} w_i (1 - TV_j) (P(d_1..d_j all accepted))."""
    a = (1 - tv).clamp(0, 1) * valid
    w = a if ratio is None else ratio.clamp(0, 1) * valid
    before = torch.cat([torch.ones_like(w[..., :1]), torch.cumprod(w[..., :-1], dim=-1)], dim=-1)  # prod_{i<j} w_i
    return before * a


def e2e_blocks(T: BlockTargets) -> torch.Tensor:
    """[B,M] the blocks the end-to-end objective averages over: valid accepted-stream blocks."""
    m = T.valid[..., 0]
    return m & T.acc_block if T.acc_block is not None else m


def e2e_sums(logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, cfg: LossConfig) -> StreamSums:
    """-E[accepted] summed over blocks (maximising the expected accepted length = minimising this).

    TV_j comes from the top-k + tail buckets (`bucket_divergence("tv")`): with P, Q the true distributions and the
    tail bucket's masses p_t, q_t, |p_t - q_t| <= sum over tail ids of |p - q| <= p_t + q_t, so
        TV_bucket <= TV <= TV_bucket + min(p_t, q_t),
    i.e. 1 - TV_bucket over-states the acceptance probability by at most min(p_t, q_t) per position (exact when
    the top-k covers the vocabulary). The path ratio uses the exact recorded p(d) and the current q(d).

    The path estimator's expectation is over drafts d ~ q, so its gradient has two parts: the one through the
    formula (min(1, p/q) and TV given d) and the score-function part E[R_i grad log q(d_i)], R_i = what the positions
    after i contribute (d_i decides whether they are reached and at which prefix). `loss.e2e_score` (default on)
    adds the second as a zero-valued surrogate with a leave-one-out baseline; without it the gradient is biased
    (tests/test_methods_losses.py measures both against the exact gradient). The drafts come from the rollout's
    drafter, at most `learner.refresh_every` steps old: the small off-policy lag is not importance-corrected.
    """
    tv = bucket_divergence("tv", logq, t2d, T)
    valid = T.valid.float()
    blocks = e2e_blocks(T)
    s = logq.sum() * 0.0
    if cfg.e2e_estimator == "path":
        lq = token_logq(logq, t2d, T.draft_tokens)
        lp = torch.log(T.p_draft.float().clamp_min(EPS))
        ratio = torch.exp((lp - lq).clamp(max=0.0))
        e = expected_length(tv, valid, ratio)
        if cfg.e2e_score and bool(blocks.any()):
            s = s - score_surrogate(tv.detach(), valid, ratio.detach(), lq, blocks)
    else:
        e = expected_length(tv, valid)
    if bool(blocks.any()):
        s = s - (e * blocks).sum()
    z = logq.sum() * 0.0
    return StreamSums(s, float(blocks.sum()), z, 0.0, 0)


def score_surrogate(
    tv: torch.Tensor, valid: torch.Tensor, ratio: torch.Tensor, lq: torch.Tensor, blocks: torch.Tensor
) -> torch.Tensor:
    """sum over blocks and positions of (R_i - b_i) * (log q(d_i) - log q(d_i).detach()): value 0, gradient the
    score-function part of grad E[accepted]. R_i = sum_{j>i} prod_{k<j} w_k (1 - TV_j) (the reward after position i),
    b_i = the mean R_i of the batch's other blocks (leave-one-out: no bias)."""
    terms = length_terms(tv, valid, ratio)
    after = terms.flip(-1).cumsum(-1).flip(-1) - terms  # R_i = sum_{j>i} terms_j
    m = blocks[..., None].float() * valid
    n = m.sum((0, 1))  # [K] blocks with position i
    tot = (after * m).sum((0, 1))
    base = (tot - after) / (n - 1).clamp_min(1)  # leave-one-out mean at the same position
    adv = (after - base) * m
    return (adv * (lq - lq.detach())).sum()


def finish(s: StreamSums, cfg: LossConfig, denom: float | None = None) -> LossParts:
    """The joint token mean of the stream sums (denom: an all-reduced weight to divide by instead)."""
    d = s.weight(cfg) if denom is None else denom
    loss = (cfg.lambda_acc * s.acc + (cfg.lambda_rej or 0.0) * s.rej) / max(d, EPS)
    return LossParts(
        loss=loss, acc=float(s.acc.detach()) / max(s.n_acc, EPS), rej=float(s.rej.detach()) / max(s.w_rej, EPS),
        n_acc=int(s.n_acc), n_rej=s.n_rej, w_rej=s.w_rej,
    )  # fmt: skip


def opd_loss(
    logq: torch.Tensor, t2d: torch.Tensor, T: BlockTargets, cfg: LossConfig, denom: float | None = None
) -> LossParts:
    """The Draft-OPD objective over both streams of verification blocks (cfg: a resolved `Config.loss`)."""
    return finish(block_sums(logq, t2d, T, cfg), cfg, denom)


def sft_loss(
    logq: torch.Tensor,
    t2d: torch.Tensor,
    T: BlockTargets,
    step_weight: torch.Tensor,
    objective: str,
    denom: float | None = None,
) -> LossParts:
    """The weighted mean of the supervised objective over valid positions."""
    s = sft_sums(logq, t2d, T, step_weight, objective)
    loss = s.acc / (max(s.n_acc, EPS) if denom is None else max(denom, EPS))
    return LossParts(loss=loss, acc=float(loss.detach()), rej=0.0, n_acc=int(T.valid.sum()), n_rej=0, w_rej=0.0)


# --- exact full-vocabulary targets (records carrying the target's final hidden state) --------------------------


def full_soft_ce(
    logq: torch.Tensor, T: BlockTargets, head: torch.Tensor, draft_ids: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """[B,M,K] soft cross-entropy -sum_d p_d log q_d to p = softmax(target logits over the draft vocabulary) at T = 1
    (EAGLE-3's native loss: `softmax(target_logits[:, t2d])`, eagle3_student.py @a737810), the target logits being
    the frozen head applied to the record's hidden state; 0 where a position has none (`T.hidden_ok`)."""
    out = logq.new_zeros(logq.shape[:-1])
    sel = T.hidden_ok
    if T.hidden is None or not bool(sel.any()):
        return out
    lq, hid = logq[sel], T.hidden[sel]
    w = head[draft_ids]
    parts = []
    for i in range(0, lq.shape[0], chunk):
        with torch.no_grad():
            p = torch.softmax(torch.nn.functional.linear(hid[i : i + chunk].to(w.dtype), w).float(), -1)
        parts.append(-(p * lq[i : i + chunk]).sum(-1))
    out[sel] = torch.cat(parts)
    return out


def tv_positions(T: BlockTargets) -> torch.Tensor:
    """[B,M,K] the exact-TV objective's positions: in each accepted-stream block, offsets 1..r with r the first
    rejection (a block without one: all of its positions; never a bonus token, which has no block position), inside
    the answer and with the target's hidden state known (`_build_tv_position_plan`, first-token-only)."""
    K = T.accept.shape[-1]
    acc = (T.accept & T.valid).long().cumprod(-1).sum(-1, keepdim=True)
    j = torch.arange(K, device=T.accept.device)
    pos = T.valid & (j <= acc) & e2e_blocks(T)[..., None]
    return pos & T.hidden_ok if T.hidden_ok is not None else torch.zeros_like(pos)


def full_tv(
    q_logits: torch.Tensor, target_hidden: torch.Tensor, head: torch.Tensor, draft_ids: torch.Tensor | None
) -> torch.Tensor:
    """[N] exact total variation 1/2 sum_v |q(v) - p(v)| over the FULL vocabulary at T = 1 in fp32
    (`full_vocab_tv_distance`, dflash_student.py @a737810): q = softmax of the drafter's logits [N, Vd] (a reduced
    vocabulary puts no mass elsewhere), p = softmax of the frozen head on the target's hidden state (no gradient)."""
    q = torch.softmax(q_logits.float(), -1)
    with torch.no_grad():
        p = torch.softmax(torch.nn.functional.linear(target_hidden.to(head.dtype), head).float(), -1)
    if draft_ids is not None and q.shape[-1] != p.shape[-1]:
        q = q.new_zeros(p.shape).index_copy(1, draft_ids, q)
    return 0.5 * (q - p).abs().sum(-1)


def tv_block_loss(d: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block (d, pos [B,M,K], positions a prefix of the block): (1 - E/n, E) with E = sum_k prod_{j<=k}
    clip(1 - d_j, 0, 1), the block's expected accepted positions, and n its number of positions (0 where n = 0)."""
    a = (1 - d).clamp(0, 1) * pos
    E = torch.cumprod(a, -1).sum(-1)
    n = pos.sum(-1)
    return torch.where(n > 0, 1 - E / n.clamp_min(1), torch.zeros_like(E)), E
