"""LK loss (negative log-acceptance), from "LK Losses: Direct Acceptance Rate Optimization for Speculative
Decoding", Samarin et al., arXiv 2602.23881 (2026): instead of KL, train the draft to maximise the acceptance rate
of speculative sampling directly. At a position with target distribution p and draft distribution q the
probability that the draft's token is accepted is

    alpha(p, q) = sum_v min(p(v), q(v)) = 1 - TV(p, q),

and the paper's LK^alpha loss is  L = -log alpha(p, q),  whose gradient is TV's scaled by 1/alpha (large where the
draft is far off, where plain TV's is tiny). dopd trains it on-policy: per rollout verification block, the
positions at offsets 1..r (the accepted drafts and the first rejection: where the target's distribution on the
drafter's own trajectory is known), alpha exact over the FULL vocabulary at T = 1 (p = softmax of the frozen head
on the target's hidden state the records carry: this objective declares "hidden"; a reduced draft vocabulary puts
no mass outside it), the token mean over those positions. (The paper's other variant, a KL/TV hybrid with an
adaptive weight, is not implemented here.)
"""

from __future__ import annotations

import torch

from dopd.common.config import Config

from ..losses import EPS, tv_positions
from .base import BlockObjective, Mask, register


def acceptance(q_logits: torch.Tensor, target_hidden: torch.Tensor, head: torch.Tensor, draft_ids) -> torch.Tensor:
    """[N] alpha = sum_v min(p(v), q(v)) over the full vocabulary, in fp32: q = softmax of the draft logits [N, Vd]
    placed at `draft_ids` (None: the full vocabulary), p = softmax(head @ hidden) without gradient."""
    q = torch.softmax(q_logits.float(), -1)
    with torch.no_grad():
        p = torch.softmax(torch.nn.functional.linear(target_hidden.to(head.dtype), head).float(), -1)
    if draft_ids is not None and q.shape[-1] != p.shape[-1]:
        q = q.new_zeros(p.shape).index_copy(1, draft_ids, q)
    return torch.minimum(p, q).sum(-1)


def lk_alpha_loss(alpha: torch.Tensor) -> torch.Tensor:
    """The LK^alpha loss -log alpha (alpha floored at EPS: an all-rejecting draft keeps a finite loss)."""
    return -torch.log(alpha.clamp_min(EPS))


@register
class LK(BlockObjective):
    name = "lk"
    source = "LK losses, arXiv 2602.23881 (Samarin et al. 2026): L = -log sum_v min(p, q), the negative log acceptance"

    @classmethod
    def records(cls, cfg: Config) -> set[str]:
        return {"blocks", "hidden"}  # the rollout's blocks and the target's hidden state along them

    def mask(self, batch, t2d) -> Mask:
        return Mask({"lk": tv_positions(batch.targets).float()}, {"lk": 1.0})

    def sums(self, drafter, batch, mask, step):
        T = batch.targets
        pos = mask.streams["lk"] > 0
        h = drafter.block_hidden(batch.tokens, batch.features, batch.lengths, batch.anchors, batch.block_tokens)
        if not bool(pos.any()):
            return {"lk": drafter.logits(h).sum() * 0.0}, {}
        ids = drafter.draft_ids if drafter.lm_head is not None else None
        alpha = acceptance(drafter.logits(h[pos]), T.hidden[pos], drafter.head_weight, ids)
        loss = (lk_alpha_loss(alpha) * mask.streams["lk"][pos]).sum()
        return {"lk": loss}, {"lk_alpha": float(alpha.detach().mean())}
