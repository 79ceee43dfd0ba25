"""Token distributions and the lossless verification rule.

Verification is what makes speculative decoding lossless, so it lives in one small function with no engine state:
greedy match at temperature 0; at temperature > 0 the standard rejection-sampling rule (accept d_i with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection resample from norm(max(0, p_i - q_i)); if all K
are accepted, a bonus token from p_{K+1}). p and q are the *processed* distributions (temperature, then top-p) of
target and drafter, so the output is distributed exactly as the target sampled with the same settings.

`rule="match"` is the other lossless rule at T > 0 (greedy-match acceptance, what Bebop compares against): the
target samples x_i ~ p_i at every position and draft i is accepted iff d_i == x_i; the first mismatching x_i (or
x_{K+1}) is committed. Each committed token is a draw from p given the committed prefix, so the output is the
target's sampling exactly, but a draft is accepted with probability p_i(d_i) instead of sum min(p_i, q_i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def processed_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution: one-hot argmax at T=0, else softmax(logits/T) restricted to the top-p nucleus."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the top token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` [..., V] (argmax for one-hot rows is the same draw)."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])


@dataclass
class Verdict:
    """The outcome of verifying one block per row."""

    num_accepted: torch.Tensor  # [B] leading draft tokens accepted (0..K)
    next_token: torch.Tensor  # [B] correction (on rejection) or bonus (all accepted) token from the target
    accept_mask: torch.Tensor  # [B, K] bool, True for the accepted prefix


def verify(
    draft: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor | None,
    greedy: bool,
    generator: torch.Generator | None = None,
    rule: str = "rejection",
) -> Verdict:
    """Verify K draft tokens per row against the target.

    draft [B, K] target-vocabulary ids; p [B, K+1, V] target distributions at the K draft positions and the bonus
    position; q [B, K, V] the drafter's processed distributions (unused when greedy or with rule "match").
    """
    B, K = draft.shape
    dev = draft.device
    if K == 0:
        nxt = p[:, 0].argmax(-1) if greedy else sample(p[:, 0], generator)
        return Verdict(
            torch.zeros(B, dtype=torch.long, device=dev), nxt, torch.zeros(B, 0, dtype=torch.bool, device=dev)
        )
    if greedy:
        target_tok = p.argmax(-1)  # [B, K+1]
        ok = draft == target_tok[:, :K]
        n = ok.long().cumprod(-1).sum(-1)
        nxt = target_tok.gather(1, n[:, None]).squeeze(1)
    elif rule == "match":
        x = sample(p, generator)  # [B, K+1]: the target's own draw at every position
        ok = draft == x[:, :K]
        n = ok.long().cumprod(-1).sum(-1)
        nxt = x.gather(1, n[:, None]).squeeze(1)
    elif rule != "rejection":
        raise ValueError(f"unknown verification rule '{rule}' (rejection | match)")
    else:
        assert q is not None, "sampling verification needs the drafter's distributions q"
        pd = p[:, :K].gather(-1, draft[..., None]).squeeze(-1)
        qd = q.gather(-1, draft[..., None]).squeeze(-1)
        u = torch.rand(B, K, generator=generator, device=dev)
        ok = u * qd < pd  # u < p/q without dividing (q(d) > 0 because d was drawn from q)
        n = ok.long().cumprod(-1).sum(-1)
        rows = torch.arange(B, device=dev)
        p_n = p[rows, n]  # [B, V]: target at the first rejected position, or the bonus position when n == K
        q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
        resid = (p_n - q_pad[rows, n]).clamp_min(0)
        mass = resid.sum(-1, keepdim=True)
        # all accepted -> q_pad row is zero and resid == p (the bonus draw); a zero residual cannot be reached
        # with positive probability, but guard the division anyway by falling back to p
        dist = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_n)
        nxt = sample(dist, generator)
    accept = torch.arange(K, device=dev)[None, :] < n[:, None]
    return Verdict(n, nxt, accept)
