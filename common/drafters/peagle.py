"""P-EAGLE (parallel EAGLE) drafter: EAGLE-3's modules, all K draft tokens from one forward.

What it is, as speculators 0.9.0 defines it (`speculators/models/peagle/core.py` `PEagleDraftModel.forward`,
`attention.py` `create_peagle_mask_mod`, `config.py` `PEagleSpeculatorConfig`, in the PyPI release 0.9.0):
- the layers, `fc`, norms and head are EAGLE-3's (PEagleDraftModel subclasses Eagle3DraftModel; same first layer
  concat(input_layernorm(embed), hidden_norm(h)), residual = h), so dopd's EAGLE-3 modules and names are reused;
- the context is EAGLE-3's: entry p = (x_p, fc(f_{p-1})), causal over the entries ("depth 0");
- a block anchored at the last committed entry a-1 adds K-1 parallel queries ("depths" 1..K-1) at positions
  a-1+d whose inputs are the embedding of `mask_token_id` and fc(`mask_hidden`), a learned vector in the fused
  feature space ([1, 1, n_aux * H] in speculators); depth d attends to the context entries <= a-1 and to its own
  block's depths 1..d (`same_rollout & q_depth >= kv_depth`); its output predicts position a+d. Depth 0 is the
  context entry itself, predicting position a. No hidden state is carried from one draft to the next, so the
  whole block is one forward at inference and in training alike (no TTT unroll).
- the format: `speculators_model_type: peagle`, architectures `PEagleSpeculator`, EAGLE-3's config plus
  `mask_token_id`, EAGLE-3's keys plus `mask_hidden`.

dopd's differences: the token embedding is the target's, frozen (speculators' P-EAGLE trains it by default;
`embed_requires_grad` is written false), and `drafter.mask_token_id` unset means token 0 (its embedding only
enters through input_layernorm next to the learned `mask_hidden`). Training: the rollout's verification blocks
with DFlash's Draft-OPD block streams (a parallel drafter drafts its blocks the way DFlash does; dopd's choice, no
official P-EAGLE OPD recipe exists); SFT: teacher-forced blocks of K at every answer position, flat weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .base import DrafterSpec, Proposal, register_kind
from .eagle3 import Eagle3Drafter
from .layers import grouped_attention


class MaskHidden(nn.Module):
    """The learned fused-feature input of the parallel depths (a module so ZeRO-3 gathers it when used)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(dim))

    def forward(self) -> torch.Tensor:
        return self.weight


@register_kind
class PEagleDrafter(Eagle3Drafter):
    kind = "peagle"
    default_loss = {"objective": "opd", "response": "blocks", "acc_divergence": "bernoulli", "lambda_rej": 1.0}
    export_formats = ("speculators",)
    import_formats = ("speculators-peagle",)
    speculators_type = "peagle"
    speculators_architecture = "PEagleSpeculator"

    @classmethod
    def sft_depth(cls, cfg) -> int:
        return cfg.rollout.block_size

    @classmethod
    def sft_step_weights(cls, cfg) -> torch.Tensor:
        return torch.ones(cls.sft_depth(cfg))

    def __init__(self, spec: DrafterSpec, embed_weight, head_weight, draft_ids=None):
        super().__init__(spec, embed_weight, head_weight, draft_ids)
        self.mask_hidden = MaskHidden(len(spec.feature_layers) * spec.target_hidden_size)
        self.mask_token = 0 if spec.mask_token_id is None else int(spec.mask_token_id)
        if not 0 <= self.mask_token < spec.vocab_size:
            raise ModelError(
                f"drafter.mask_token_id {self.mask_token} is outside the target vocabulary {spec.vocab_size}"
            )

    # --- the parallel block ---------------------------------------------------------------------------------
    def _depths(self, h0: torch.Tensor, ks, vs, ctx_mask: torch.Tensor, a: torch.Tensor, K: int) -> torch.Tensor:
        """Normed hidden [B,M,K,H] of blocks whose depth 0 is h0 [B,M,H] (pre-norm output of the entry at a-1):
        depths 1..K-1 attend to the context keys `ctx_mask` allows [B,M,S] and causally to each other."""
        outs = [h0[:, :, None]]
        if K > 1:
            B, M, H = h0.shape
            T = K - 1
            ids = torch.full((B, M, T), self.mask_token, dtype=torch.long, device=h0.device)
            emb = self.embed(ids)
            h = self.fc(self.mask_hidden().to(emb.dtype)).expand(B, M, T, H)
            pos = (a - 1)[..., None] + torch.arange(1, K, device=h0.device)  # [B,M,T]
            own = torch.ones(T, T, dtype=torch.bool, device=h0.device).tril()
            for li, layer in enumerate(self.layers):
                x = layer.attn_input(emb, h)
                q = layer.self_attn.q(x).transpose(1, 2)  # [B,h,M,T,d]
                k, v = layer.self_attn.kv(x)
                k, v = k.transpose(1, 2), v.transpose(1, 2)
                q, k = self.rotary(q, pos[:, None]), self.rotary(k, pos[:, None])
                o = grouped_attention(q, ks[li].to(q.dtype), vs[li].to(q.dtype), ctx_mask, k, v, own)
                h = layer.finish(o.transpose(1, 2), h)
            outs.append(h)
        return self.norm(torch.cat(outs, dim=2))

    def _parallel(self, tokens, features, lengths, anchors, K) -> torch.Tensor:
        h_ctx, ks, vs = self._context(tokens, features, lengths)
        S = tokens.shape[1]
        a = anchors.clamp(min=1)
        h0 = h_ctx.gather(1, (a - 1)[..., None].expand(-1, -1, h_ctx.shape[-1]))
        s = torch.arange(S, device=tokens.device)
        ctx_mask = (s[None, None, :] >= 1) & (s[None, None, :] <= (a - 1)[..., None])
        ctx_mask = ctx_mask | (s[None, None, :] == 0) & (anchors[..., None] < 2)  # padding blocks: see something
        return self._depths(h0, ks, vs, ctx_mask, a, K)

    def block_hidden(self, tokens, features, lengths, anchors, block_tokens):
        return self._parallel(tokens, features, lengths, anchors, block_tokens.shape[-1])

    @torch.no_grad()
    def draft_blocks(self, tokens, features, lengths, anchors, K, temperature=0.0, generator=None):
        return self._sample_blocks(self._parallel(tokens, features, lengths, anchors, K), temperature, generator)

    @torch.no_grad()
    def propose(
        self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None
    ) -> Proposal:
        h0, ks, vs, ctx_mask, a = self._extend(state, rows, tokens, features, lengths)
        h = self._depths(h0, ks, vs, ctx_mask, a, K)[:, 0]  # [b,K,H]
        b = h.shape[0]
        ids, qf, qt, lp, _ = self._sample(self.logits(h).reshape(b * K, -1), temperature, top_p, generator)
        q = qf.view(b, K, -1) if qf is not None else None
        return Proposal(ids.view(b, K), q, qt.view(b, K), lp.view(b, K))

    # --- format: speculators' PEagleSpeculator --------------------------------------------------------------
    def speculators_extra(self, state: dict[str, torch.Tensor]) -> dict:
        state["mask_hidden"] = state.pop("mask_hidden.weight").view(1, 1, -1)
        return {"mask_token_id": self.mask_token}

    @classmethod
    def import_extra(cls, meta: dict, state: dict, where: str) -> dict:
        if "mask_hidden" not in state:
            raise ModelError(f"{where}: a P-EAGLE drafter without mask_hidden (the parallel depths' input)")
        return {"mask_hidden.weight": state["mask_hidden"].float().flatten()}

    @classmethod
    def import_mask_token_id(cls, meta: dict) -> int | None:
        return meta.get("mask_token_id")
