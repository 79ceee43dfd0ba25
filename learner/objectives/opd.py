"""Draft-OPD: the accepted and rejected streams of the rollout's verification blocks, in one joint mean.

Reproduces the official Draft-OPD losses (common/recipes.py names the files and commits: official-2605 for DFlash,
official-eagle3 for EAGLE-3; learner/losses.py has the per-position math). The accepted stream is the accepted
positions (+ the first rejected one, `loss.acc_at_first_rejection`) of blocks flagged STREAM_ACC, or, with
`loss.response=ttt` (EAGLE-3's recipe), the training-time test over every response position of the records' text
(soft cross-entropy to the target's full distribution over the draft vocabulary with `loss.targets=full`); the
rejected stream is the drafted tokens from the first rejection to the block end, weighted gamma^(offset-1), of
blocks flagged STREAM_REJ (only the first rejected token, weight 1, with `loss.rej_first_only`). The normaliser is
lambda_acc * N_acc + lambda_rej * sum of the rejected weights, N_acc = every answer token of the batch
(`loss.acc_denominator=response_tokens`, the official [docs/recipes.md R3] one) or the accepted stream's own weights.
"""

from __future__ import annotations

import torch

from dopd.common.config import Config
from dopd.common.errors import ConfigError

from ..batch import sft_batch
from ..diagnostics import replay_split
from ..losses import (
    _clamped,
    acc_divergence,
    full_soft_ce,
    opd_masks,
    rej_divergence,
    sft_per_position,
    sft_valid,
    token_args,
    token_silenced,
)
from . import register
from .base import Mask, Objective, logq


def silenced_share(
    kind: str, values: torch.Tensor, lq: torch.Tensor, t2d, tokens, p_tokens, weights: torch.Tensor, lc
) -> float | None:
    """The share of a stream's positions (weight > 0) whose gradient a floor, clip or the loss clamp zeroes."""
    on = weights > 0
    if not bool(on.any()):
        return None
    if kind in ("k3", "bernoulli"):
        s = token_silenced(kind, lq, t2d, tokens, p_tokens, lc.k3, lc.log_floor, lc.clamp)
    else:
        s = values.detach() > lc.clamp if lc.clamp is not None else torch.zeros_like(on)
    return float((s & on).sum()) / float(on.sum())


@register
class DraftOPD(Objective):
    name = "opd"
    source = "Draft-OPD: bingyang-lei/Draft-OPD losses.py distillation_loss (recipes official-2605 @69b03da, official-eagle3 @a737810)"

    @classmethod
    def check(cls, cfg: Config) -> None:
        lc = cfg.loss
        if lc.targets == "full" and lc.response == "blocks" and lc.acc_divergence in ("fkl", "tv", "jsd"):
            raise ConfigError(
                f"loss.targets=full with loss.response=blocks and loss.acc_divergence={lc.acc_divergence}: the block "
                "streams train top-k bucket divergences (bernoulli and k3 are exact from the records as they are); "
                "use loss.targets=topk, loss.response=ttt, or loss.objective=e2e_tv for exact full-vocabulary TV"
            )

    def prepare(self, batch, records, rng, device):
        if self.lc.response == "ttt":
            batch.ttt = sft_batch([r.as_teacher() for r in records], self.cfg, rng, device)
            batch.ttt.response_tokens = batch.response_tokens
            # the TTT blocks are the accepted stream; verification blocks then feed only the rejected stream
            batch.targets.acc_block = torch.zeros_like(batch.targets.valid[..., 0])
        return batch

    def mask(self, batch, t2d) -> Mask:
        acc, rej = opd_masks(batch.targets, self.lc)
        if batch.ttt is not None:
            T = batch.ttt.targets
            acc = sft_valid(T, t2d, batch.ttt.step_weight)
            if self.lc.targets == "full":
                if T.hidden is None:
                    raise ValueError(
                        "loss.targets=full: the records carry no target hidden state (an actor of another config?)"
                    )
                acc = acc * T.hidden_ok
        counts = {"acc": float(batch.response_tokens)} if self.lc.acc_denominator == "response_tokens" else {}
        return Mask({"acc": acc, "rej": rej}, {"acc": self.lc.lambda_acc, "rej": self.lc.lambda_rej or 0.0}, counts)

    def sums(self, drafter, batch, mask, step):
        lc = self.lc
        acc_w, rej_w = mask.streams["acc"], mask.streams["rej"]
        out: dict[str, torch.Tensor] = {}
        info: dict = {}
        blocks_acc = batch.ttt is None and bool(acc_w.any())
        if batch.ttt is not None:
            t = batch.ttt
            lq_t = logq(drafter, t)
            if lc.targets == "full":
                per = full_soft_ce(lq_t, t.targets, drafter.head_weight, drafter.draft_ids)
            else:
                per = sft_per_position(lq_t, drafter.t2d, t.targets, lc.sft_objective)
            out["acc"] = (per * acc_w).sum()
        lq = None
        if blocks_acc or bool((rej_w > 0).any()):
            lq = logq(drafter, batch)
            zero = lq.sum() * 0.0
            T, tok = batch.targets, token_args(lc)
            if batch.ttt is None:
                if blocks_acc:
                    v = acc_divergence(lc.acc_divergence, lq, drafter.t2d, T, **tok)
                    out["acc"] = (_clamped(v, lc) * acc_w).sum()
                    info["acc_silenced"] = silenced_share(
                        lc.acc_divergence, v, lq, drafter.t2d, T.topk_ids[..., 0], T.topk_probs[..., 0], acc_w, lc
                    )
                else:
                    out["acc"] = zero
            if bool((rej_w > 0).any()):
                v = rej_divergence(lc.rej_divergence, lq, drafter.t2d, T, **tok)
                out["rej"] = (_clamped(v, lc) * rej_w).sum()
                info["rej_silenced"] = silenced_share(
                    lc.rej_divergence, v, lq, drafter.t2d, T.draft_tokens, T.p_draft, rej_w, lc
                )
            else:
                out["rej"] = zero
        if not out:
            raise ValueError("an OPD batch with nothing to train (no accepted or rejected positions, no TTT positions)")
        if self.cfg.metrics.replay_kl:
            info.update(replay_split(drafter, batch, lq=lq))
        return out, {k: v for k, v in info.items() if v is not None}
