"""The authors' end-to-end exact-TV objective (recipe official-tv: bingyang-lei/Draft-OPD e81a8bc's
`run_qwen_gsm8k_forward-8b-local.sh` over a737810's `_exact_tv_distillation_loss` / `_forward_opd_tv`).

One objective replaces both streams: per rollout verification block, the positions at offsets 1..r (the accepted
drafts and the first rejection; every position of a block without one), d_k = exact total variation over the full
vocabulary between the drafter and the target on its own trajectory (the target's hidden state from the record,
through the frozen head: `loss.targets=full`), block loss 1 - (1/n) sum_k prod_{j<=k} clip(1 - d_j, 0, 1); the
mean over blocks. The normaliser is per BLOCK (the mask is [B,M]): a learner group all-reduces the block count as it
does a token count, so every rank divides by the blocks of the whole global batch (the official [docs/recipes.md R12] all-reduced
`opd_tv_global_block_count`). Math: learner/losses.py `tv_positions`, `full_tv`, `tv_block_loss`.
"""

from __future__ import annotations

import torch

from dopd.common.config import Config
from dopd.common.errors import ConfigError

from ..diagnostics import replay_split
from ..losses import full_tv, tv_block_loss, tv_positions
from .base import BlockObjective, Mask, register


@register
class ExactTV(BlockObjective):
    name = "e2e_tv"
    source = "bingyang-lei/Draft-OPD@a737810 losses.py _exact_tv_distillation_loss, dflash_student.py _forward_opd_tv (script @e81a8bc)"

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        lc = cfg.loss
        if lc.targets != "full":
            raise ConfigError(
                "loss.objective=e2e_tv is exact TV over the full vocabulary: loss.targets must be full (records carry the target's hidden state)"
            )
        if not lc.rej_first_only:
            raise ConfigError(
                "loss.objective=e2e_tv trains positions up to each block's first rejection (the recipe's "
                "rejected_draft_first_token_only=True; later rejections would need the target on the drafter's prefix): "
                "set loss.rej_first_only=true"
            )

    @classmethod
    def records(cls, cfg: Config) -> set[str]:
        return {"blocks", "hidden"}  # exact TV needs the target's hidden state on the rollout's own blocks

    def mask(self, batch, t2d) -> Mask:
        return Mask({"tv": tv_positions(batch.targets).any(-1).float()}, {"tv": 1.0})

    def sums(self, drafter, batch, mask, step):
        T = batch.targets
        pos = tv_positions(T)
        h = drafter.block_hidden(batch.tokens, batch.features, batch.lengths, batch.anchors, batch.block_tokens)
        d = torch.zeros(pos.shape, device=h.device)
        if bool(pos.any()):
            ids = drafter.draft_ids if drafter.lm_head is not None else None
            d = d.index_put((pos,), full_tv(drafter.logits(h[pos]), T.hidden[pos], drafter.head_weight, ids))
        loss_b, E = tv_block_loss(d, pos)
        blocks = mask.streams["tv"]
        info = {}
        if bool(pos.any()):
            info = {
                "tv_distance": float(d.detach()[pos].mean()),
                "tv_expected_accept": float((E.detach() * blocks).sum() / blocks.sum()),
                "tv_positions": int(pos.sum()),
            }
        if self.cfg.metrics.replay_kl:
            info.update(replay_split(drafter, batch, h=h.detach()))
        return {"tv": (loss_b * blocks).sum()}, info
