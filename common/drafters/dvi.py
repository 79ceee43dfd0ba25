"""DVI-style self-speculative drafter: the target's own first k layers (frozen, shared) + a trainable low-rank head.

DVI (arXiv 2510.05421) splits the LLM at layer k: layers 0..k-1 plus a LoRA head on the layer-k hidden state draft,
the full model verifies (lossless, as for every drafter here). The head is

    logits = W_S . norm(h_k) + gamma * A (B norm(h_k))        W_S: the target's LM head (frozen, shared)

with A [V, r] zero-initialised (the untrained drafter is the plain early exit) and B [r, H]; `norm` is an RMSNorm of
the drafter's own (initialised to ones, so a learner holding only the target's embedding and head builds the same
drafter as an actor holding the whole target). The trainable parameters are norm, A and B: r (V + H) + H.

Sharing, not copying: the target's decoder layers, rotary embedding and token embedding are *referenced* (bound by
the engine through `bind_target`, never registered as sub-modules), so they are not parameters, not in the state
dict, not saved, not published to actors and not handed to the optimizer.

The three forwards:
- `propose` (inference) runs the shared layers on the newly committed tokens (its own K/V cache for layers 0..k-1,
  one entry per committed position, like an EAGLE-3 context) and then on each drafted token (early exit);
- `block_hidden` (training) and `draft_blocks` (re-segmentation, replay) are the teacher-forced early exit: block
  position j reads h_k at position a+j-2 of the committed text, i.e. the target feature `hidden_states[k]` the
  rollout already captured. For every position up to and including a block's first rejection the block's inputs
  *are* the committed text (the accepted drafts were committed), so this is exactly the inference computation
  there: which is every position DVI trains on (accepted + first rejection) and every position greedy tau depends
  on. Past the first rejection the inputs differ from the text, so those positions are not exact: the DVI recipe
  keeps the rejected stream off (`Config.validate` refuses it) and masks them (`on_text_positions`). Learners
  therefore need no target layers at all, only the recorded features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError
from .base import Drafter, DrafterSpec, DraftState, Proposal, register_kind
from .layers import RMSNorm, causal_attention, grouped_attention


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE (halves rotated) with the target's own cos/sin (its rope scaling included)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def on_text_positions(
    tokens: torch.Tensor, lengths: torch.Tensor, anchors: torch.Tensor, block_tokens: torch.Tensor
) -> torch.Tensor:
    """[B,M,K] True where block position j's inputs are the committed text: the block's earlier tokens equal the text
    (block_tokens[:j-1] == tokens[a:a+j-1]) and the input position a+j-2 has a feature (<= n-2). The teacher-forced
    early exit is exact there, and only there."""
    B, M, K = block_tokens.shape
    S = tokens.shape[1]
    j = torch.arange(K, device=tokens.device)
    pos = anchors[..., None] + j  # token positions a..a+K-1
    text = tokens.gather(1, pos.clamp(0, S - 1).flatten(1)).view(B, M, K)
    same = (block_tokens == text) & (pos < lengths[:, None, None])
    # position j (0-based) needs tokens 0..j-1 of the block on the text: a shifted cumulative product
    prefix_ok = torch.cat([torch.ones_like(same[..., :1]), same[..., :-1].long().cumprod(-1).bool()], dim=-1)
    has_feature = (anchors[..., None] + j - 1) <= (lengths[:, None, None] - 2)
    return prefix_ok & has_feature & (anchors[..., None] >= 1)


@register_kind
class DVIDrafter(Drafter):
    """Defaults: the exit layer k = max(1, L//4) (hidden_states[k] = the output of the shared layers 0..k-1); SFT =
    one position per answer position (its teacher-forced early exit depends on nothing drafted, so a longer block
    would only repeat positions); the recipe: DVI's online schedule (`loss.objective=dvi`) on the rollout's blocks."""

    kind = "dvi"
    default_loss = {"objective": "dvi", "response": "blocks", "acc_divergence": "fkl", "lambda_rej": 0.0}

    @classmethod
    def default_feature_layers(cls, num_target_layers: int, num_draft_layers: int) -> list[int]:
        return [max(1, num_target_layers // 4)]

    @classmethod
    def check_config(cls, cfg, feature_layers, num_target_layers) -> None:
        L = num_target_layers
        if len(feature_layers) != 1 or not 1 <= feature_layers[0] <= L:
            raise ModelError(
                f"a DVI drafter exits after the target's first k layers: drafter.feature_layers=[k] with 1 <= k <= {L} (got {feature_layers})"
            )
        if cfg.draft_vocab_size is not None or cfg.train_lm_head:
            raise ModelError(
                "a DVI drafter drafts with the target's head plus a low-rank term: drafter.draft_vocab_size and drafter.train_lm_head are not supported"
            )

    @classmethod
    def check_recipe(cls, cfg) -> None:
        # the training forward is exact only on the committed text (up to each first rejection)
        lc = cfg.loss
        if cfg.loss.objective != "dvi" and (lc.response != "blocks" or lc.lambda_rej or cfg.replay.extra != "none"):
            raise ConfigError(
                "drafter.kind=dvi trains on the committed text only: loss.response=blocks, loss.lambda_rej=0, replay.extra=none"
            )

    @classmethod
    def spec_extra(cls, cfg) -> dict:
        return {"lora_rank": cfg.lora_rank, "lora_gamma": cfg.lora_gamma}

    @classmethod
    def sft_depth(cls, cfg) -> int:
        return 1

    @classmethod
    def trainable_positions(cls, tokens, lengths, anchors, block_tokens) -> torch.Tensor:
        return on_text_positions(tokens, lengths, anchors, block_tokens)

    def __init__(self, spec: DrafterSpec, embed_weight, head_weight, draft_ids=None):
        if spec.own_head:
            raise ModelError(
                "a DVI drafter drafts with the target's own head plus a low-rank term: drafter.draft_vocab_size and drafter.train_lm_head are not supported"
            )
        if len(spec.feature_layers) != 1:
            raise ModelError(
                f"a DVI drafter exits at one layer (drafter.feature_layers=[k]), got {spec.feature_layers}"
            )
        super().__init__(spec, embed_weight, head_weight, draft_ids)
        r = spec.lora_rank
        if r is None or r < 1:
            raise ModelError(f"drafter.lora_rank must be >= 1 for a DVI drafter (got {r})")
        H = spec.hidden_size
        self.norm = RMSNorm(H, spec.rms_eps)
        self.lora_A = nn.Parameter(torch.zeros(spec.vocab_size, r))
        self.lora_B = nn.Parameter(torch.randn(r, H) / H**0.5)
        self._target = None  # the target's HF model, referenced (see bind_target), never a sub-module

    @property
    def exit_layer(self) -> int:
        """k: the shared layers are the target's layers 0..k-1 and h_k = hidden_states[k]."""
        return self.spec.feature_layers[0]

    # --- sharing ------------------------------------------------------------------------------------------------
    def bind_target(self, model: nn.Module) -> None:
        """Reference the target's first k layers (the engine binds its own target before drafting)."""
        n = len(model.model.layers)
        if not 1 <= self.exit_layer <= n:
            raise ModelError(f"DVI exit layer {self.exit_layer} out of range for a {n}-layer target")
        object.__setattr__(self, "_target", model)  # plain attribute: not registered, so not a parameter or buffer

    def shared_layers(self) -> list[nn.Module]:
        if self._target is None:
            raise ModelError("this DVI drafter is not bound to a target (SpecEngine binds it; or call bind_target)")
        return list(self._target.model.layers[: self.exit_layer])

    def context_start(self) -> int:
        return 0

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._target.model.embed_tokens(ids)

    # --- head ---------------------------------------------------------------------------------------------------
    def head_input(self, h_k: torch.Tensor) -> torch.Tensor:
        return self.norm(h_k.to(self.lora_B.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """W_S h + gamma A (B h) on normed hidden states (the base class's contract for `logits`)."""
        base = F.linear(h, self.head_weight.to(h.dtype))
        return base + self.spec.lora_gamma * F.linear(F.linear(h, self.lora_B), self.lora_A)

    # --- training (teacher-forced early exit) ----------------------------------------------------------------------
    def block_hidden(self, tokens, features, lengths, anchors, block_tokens):
        K = block_tokens.shape[-1]
        pos = (anchors[..., None] + torch.arange(K, device=anchors.device) - 1).clamp(0, features.shape[1] - 1)  # a+j-2
        B, M, _ = pos.shape
        h = features.gather(1, pos.flatten(1)[..., None].expand(-1, -1, features.shape[-1])).view(B, M, K, -1)
        return self.head_input(h)

    @torch.no_grad()
    def draft_blocks(self, tokens, features, lengths, anchors, K, temperature=0.0, generator=None):
        """Block tokens from the teacher-forced early exit (exact up to and including the first mismatch)."""
        B, M = anchors.shape
        h = self.block_hidden(
            tokens, features, lengths, anchors, torch.zeros(B, M, K, dtype=torch.long, device=anchors.device)
        )
        return self._sample_blocks(h, temperature, generator)

    # --- inference (the shared layers, early exit) -------------------------------------------------------------
    def new_state(self, batch, max_len, device, dtype) -> DraftState:
        t = self.shared_layers()[0].self_attn
        cfg = self._target.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        shape = (batch, kv_heads, max_len, t.head_dim)
        tdt = next(self._target.parameters()).dtype
        ks = [torch.zeros(shape, device=device, dtype=tdt) for _ in range(self.exit_layer)]
        vs = [torch.zeros(shape, device=device, dtype=tdt) for _ in range(self.exit_layer)]
        return DraftState(ks, vs, torch.zeros(batch, dtype=torch.long, device=device))

    def _qkv(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The target layer's projections (+ Qwen3's q/k norms) and RoPE: q [..., Hq, T, d], k/v [..., Hkv, T, d]."""
        a = layer.self_attn
        d = a.head_dim
        q = a.q_proj(x).unflatten(-1, (-1, d))
        k = a.k_proj(x).unflatten(-1, (-1, d))
        v = a.v_proj(x).unflatten(-1, (-1, d))
        if getattr(a, "q_norm", None) is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k, v = q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    @staticmethod
    def _finish(layer: nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj, then the MLP block, exactly as the HF decoder layer."""
        h = h + layer.self_attn.o_proj(o.transpose(-2, -3).flatten(-2))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    @torch.no_grad()
    def propose(
        self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None
    ) -> Proposal:
        layers = self.shared_layers()
        rotary = self._target.model.rotary_emb
        dev = tokens.device
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        tok, n = sel(tokens), sel(lengths)
        c = sel(state.ctx_end).clone()
        T = int((n - c).max())
        pos = c[:, None] + torch.arange(T, device=dev)[None]  # new committed entries c..n-1, padded to T
        valid = pos < n[:, None]
        wpos = torch.where(valid, pos, state.k[0].shape[2] - 1)  # padding writes go to the spare last slot
        h = self._embed(tok.gather(1, pos.clamp(max=tok.shape[1] - 1)))
        cos, sin = rotary(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        kv_len = int(n.max())
        s = torch.arange(kv_len, device=dev)
        mask = (s[None, None, :] <= pos[..., None])[:, None]
        rr = torch.arange(tok.shape[0], device=dev) if rows is None else rows
        ks, vs = [], []
        for li, layer in enumerate(layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            state.k[li][rr[:, None], :, wpos] = k.transpose(1, 2)
            state.v[li][rr[:, None], :, wpos] = v.transpose(1, 2)
            kc, vc = sel(state.k[li])[:, :, :kv_len], sel(state.v[li])[:, :, :kv_len]
            ks.append(kc)
            vs.append(vc)
            h = self._finish(layer, h, causal_attention(q, kc, vc, mask))
        state.ctx_end[rr] = n
        h = h.gather(
            1, (n - 1 - c)[:, None, None].expand(-1, 1, h.shape[-1])
        )  # [b,1,H]: h_k at the last committed token
        ctx_mask = s[None, None, :] <= (n - 1)[:, None, None]  # [b,1,S]
        own_k: list[list[torch.Tensor]] = [[] for _ in layers]
        own_v: list[list[torch.Tensor]] = [[] for _ in layers]

        def advance(tok, h, j):  # the drafted token d_{j-1} at position n-1+(j-1), through the shared layers
            p = (n + j - 2)[:, None]  # [b,1]
            h = self._embed(tok[:, None])
            cs, sn = rotary(h, p)
            cs, sn = cs[:, None, :, None], sn[:, None, :, None]  # [b,1,M=1,T=1,d]
            for li, layer in enumerate(layers):
                q, k, v = self._qkv(layer, layer.input_layernorm(h)[:, :, None], cs, sn)  # [b,M=1,h,T=1,d]
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b,h,M,T,d]
                own_k[li].append(k)
                own_v[li].append(v)
                o = grouped_attention(q, ks[li], vs[li], ctx_mask, torch.cat(own_k[li], 3), torch.cat(own_v[li], 3))
                h = self._finish(layer, h[:, :, None], o.transpose(1, 2))[:, :, 0]
            return h

        return self._chain(
            h, K, advance, lambda h: self.logits(self.head_input(h[:, 0])), temperature, top_p, generator
        )
