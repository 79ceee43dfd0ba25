"""What a learner step reports besides its loss: where the gradient goes and how far the drafter is from the target.

Every OPD step row (metrics.jsonl; Prometheus through dopd/metrics.py `JobMetrics.diagnostics`) gets:
- `alpha_trained`: acceptance at each draft position of the rollout blocks just trained on (P(draft j accepted |
  drafts 1..j-1 accepted)): the policy's own acceptance, per position, at the moment it is trained;
- `grad_norm_head` / `grad_norm_body`: the gradient norm of the drafter's own output head (a trainable head over a
  reduced vocabulary, DVI's low-rank head) and of everything else, before clipping: a head shared by every block
  position is how a loss on one position moves the others;
- `acc_silenced` / `rej_silenced`: the share of each stream's positions whose gradient a floor, clip or the loss
  clamp sets to exactly zero (official-2605 [docs/recipes.md R5, R6]: confidently wrong drafts, r < ~-11, are silent);
- `replay_kl_<group>`: the official [docs/recipes.md R14] replay-mismatch split (`_compute_replay_dis_mismatch`, dflash_student.py
  @a737810; never part of the loss): KL(q || p) over the full vocabulary, no gradient, at every block position of
  the rollout's verification steps inside the answer, with p the target on its OWN text at that position (its
  final hidden state carried by the record, through the frozen head), grouped as matched (all), accepted (offset
  <= accepted), first_rejected (offset = accepted + 1) and post_rejection (later offsets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .losses import BlockTargets

GROUPS = ("matched", "accepted", "first_rejected", "post_rejection")
_CHUNK = 256  # positions per full-vocabulary chunk: two [chunk, V] fp32 matrices at a time


def accepted_prefix(accept: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [...] the number of drafts accepted before the first rejection."""
    return accept.long().cumprod(-1).sum(-1)


def trained_alpha(T: BlockTargets) -> list[float | None]:
    """Per draft position j: accepted / reached over the rollout blocks of a batch (None where no block reaches j)."""
    blocks = T.valid[..., 0] if T.rollout_block is None else T.valid[..., 0] & T.rollout_block
    acc = T.accept & blocks[..., None]
    before = torch.cat([torch.ones_like(acc[..., :1]), acc[..., :-1].long().cumprod(-1).bool()], -1)
    reached = before & T.valid & blocks[..., None]
    n_reach = reached.flatten(0, -2).sum(0)
    n_acc = (reached & acc).flatten(0, -2).sum(0)
    return [float(a) / float(r) if r else None for a, r in zip(n_acc.tolist(), n_reach.tolist())]


def target_logp(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """log p over the full vocabulary from the target's final hidden states [N, H] and its frozen head [V, H]."""
    return torch.log_softmax(F.linear(hidden.to(head.dtype), head).float(), -1)


@torch.no_grad()
def replay_split(drafter, batch, lq: torch.Tensor | None = None, h: torch.Tensor | None = None) -> dict:
    """The replay-mismatch split of a batch's rollout blocks (see the module docstring). `lq` (the drafter's
    log-distribution at every block position) or `h` (its normed hidden states) when the loss already computed
    them; otherwise one no-grad forward. Empty when the records carry no hidden state."""
    T = batch.targets
    if T.hidden is None:
        return {}
    sel = T.hidden_ok & T.valid
    if T.rollout_block is not None:
        sel = sel & T.rollout_block[..., None]
    if not bool(sel.any()):
        return {}
    K = sel.shape[-1]
    acc = accepted_prefix(T.accept)[..., None]
    j = torch.arange(K, device=sel.device)
    group = {"accepted": j < acc, "first_rejected": j == acc, "post_rejection": j > acc}
    if lq is None and h is None:
        h = drafter.block_hidden(batch.tokens, batch.features, batch.lengths, batch.anchors, batch.block_tokens)
    src = (lq if lq is not None else h)[sel]
    hid = T.hidden[sel]
    kl = torch.empty(src.shape[0], device=src.device)
    head, ids = drafter.head_weight, drafter.draft_ids
    for i in range(0, src.shape[0], _CHUNK):
        part = src[i : i + _CHUNK].detach()
        lqc = part.float() if lq is not None else torch.log_softmax(drafter.logits(part).float(), -1)
        lpc = target_logp(hid[i : i + _CHUNK], head)[:, ids]  # the drafter's support (its draft vocabulary)
        kl[i : i + _CHUNK] = (lqc.exp() * (lqc - lpc)).sum(-1)
    out = {"replay_kl_matched": float(kl.mean()), "replay_n_matched": int(kl.numel())}
    for name, g in group.items():
        m = g.expand_as(sel)[sel]
        if bool(m.any()):
            out[f"replay_kl_{name}"] = float(kl[m].mean())
            out[f"replay_n_{name}"] = int(m.sum())
    return out


def is_head(name: str) -> bool:
    """A parameter of the drafter's own output head (a trained head over its vocabulary, DVI's low-rank term)."""
    return name.startswith("lm_head.") or name.startswith("lora_")


def grad_norm_split(
    named: Iterable[tuple[str, torch.nn.Parameter]], grad_of: Callable[[torch.nn.Parameter], torch.Tensor | None]
) -> dict:
    """{"grad_norm_head", "grad_norm_body"}: the L2 norms of the trainable parameters' gradients (before clipping),
    split into the drafter's own head and the rest (0 where a part has no trainable parameter or no gradient)."""
    sq = {"head": 0.0, "body": 0.0}
    for name, p in named:
        if not p.requires_grad:
            continue
        g = grad_of(p)
        if g is not None:
            sq["head" if is_head(name) else "body"] += float(g.detach().float().pow(2).sum())
    return {f"grad_norm_{k}": v**0.5 for k, v in sq.items()}
