"""EAGLE-3 style drafter: fused low/mid/high target features, autoregressive over its own hidden states.

Alignment (as in EAGLE-3): the drafter's context entry at position p pairs the token x_p with the fused target
feature f_{p-1} and predicts x_{p+1}. For a block whose prefix has length a (last committed token x_{a-1}, target
features known up to a-2):
  step 1 = the context entry at p = a-1 -> predicts position a;
  step j = (embed(d_{j-1}), h_{j-1}) at position a+j-2, where h_{j-1} is step j-1's pre-norm output -> predicts
           position a+j-1; it attends to the context entries p <= a-1 and its own block's earlier steps.
The first layer sees concat(input_norm(embedding), hidden_norm(hidden)) (2H wide, residual = hidden); further
layers are ordinary decoder layers. The token embedding (and by default the LM head) is the target's, frozen.

Formats (the kind writes and reads them here; formats.py has the shared pieces and the flag facts): `speculators`
/ `vllm` = speculators' `Eagle3Speculator` (vLLM loads it), `sglang` = SGLang / SpecForge `LlamaForCausalLMEagle3`
(one `midlayer`, aux layer ids one less than HF's); import of both.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ModelError
from . import formats as fm
from .base import Drafter, DrafterSpec, DraftState, Proposal, register_kind
from .layers import Attention, RMSNorm, Rotary, SwiGLU, causal_attention, grouped_attention


class Eagle3Layer(nn.Module):
    def __init__(self, spec: DrafterSpec, first: bool):
        super().__init__()
        H = spec.hidden_size
        self.first = first
        self.input_layernorm = RMSNorm(H, spec.rms_eps)
        self.hidden_norm = RMSNorm(H, spec.rms_eps) if first else None
        in_dim = 2 * H if first else H
        self.self_attn = Attention(in_dim, H, spec.num_heads, spec.num_kv_heads, spec.head_dim, False, spec.rms_eps)
        self.post_attention_layernorm = RMSNorm(H, spec.rms_eps)
        self.mlp = SwiGLU(H, spec.intermediate_size)

    def attn_input(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.first:
            return torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)
        return self.input_layernorm(h)

    def finish(self, o: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = residual + self.self_attn.out(o)
        return x + self.mlp(self.post_attention_layernorm(x))


@register_kind
class Eagle3Drafter(Drafter):
    """Defaults: feature layers low/mid/high = hidden_states[2], [L//2], [L-3] (SpecForge's layer outputs 1, L/2-1,
    L-4 [docs/recipes.md R17]); SFT = the training-time test (TTT): a block at every answer position unrolled
    `loss.ttt_depth` (default K) steps exactly as at inference, step j weighted `loss.ttt_step_weight`^(j-1) (0.8 in
    SpecForge [docs/recipes.md R18]); the official Draft-OPD recipe for EAGLE-3 [docs/recipes.md R10]: TTT over
    every response position as the accepted stream (forward KL), rejected stream off."""

    kind = "eagle3"
    default_loss = {"objective": "opd", "response": "ttt", "acc_divergence": "fkl", "lambda_rej": 0.0}
    export_formats = ("speculators", "vllm", "sglang")
    import_formats = ("speculators-eagle3", "sglang-eagle3")
    speculators_type = "eagle3"  # `speculators_model_type` / `speculators_config.algorithm` of the speculators format
    speculators_architecture = "Eagle3Speculator"

    @classmethod
    def default_feature_layers(cls, num_target_layers: int, num_draft_layers: int) -> list[int]:
        L = num_target_layers
        return [2, L // 2, L - 3]

    @classmethod
    def sft_depth(cls, cfg) -> int:
        return max(cfg.loss.ttt_depth or cfg.rollout.block_size, 1)

    @classmethod
    def sft_step_weights(cls, cfg) -> torch.Tensor:
        return cfg.loss.ttt_step_weight ** torch.arange(cls.sft_depth(cfg), dtype=torch.float32)

    @classmethod
    def sft_anchors(cls, rec, cfg, rng) -> np.ndarray:
        return np.arange(max(rec.prompt_len, 2), rec.token_ids.shape[0], dtype=np.int64)  # entry 0 has no feature

    # --- formats --------------------------------------------------------------------------------------------
    def check_export(self, fmt: str) -> None:
        spec = self.spec
        if len(spec.feature_layers) != 3:
            raise ModelError(
                f"{fmt} cannot represent an EAGLE-3 drafter with {len(spec.feature_layers)} feature layers "
                f"{spec.feature_layers}: the servers' fc takes exactly 3 (low, mid, high)"
            )
        if fmt == "sglang" and spec.num_layers != 1:
            raise ModelError(
                f"SGLang cannot represent a {spec.num_layers}-layer EAGLE-3 drafter: LlamaForCausalLMEagle3 holds one "
                "`midlayer` (multi-layer support differs by SGLang version); export with --format speculators for vLLM"
            )

    def speculators_extra(self, state: dict[str, torch.Tensor]) -> dict:
        """Config entries the speculators format of this kind adds to EAGLE-3's; may rename entries of `state` (a
        subclass's own weights under speculators' names)."""
        return {}

    def export(self, fmt, out, verifier, verifier_archs, speculative_tokens) -> None:
        spec = self.spec
        ids, head, _ = fm.vocab_tensors(self)
        V, Vd = spec.vocab_size, ids.numel()
        state = fm.module_state(self)
        state["lm_head.weight"] = head.contiguous()
        state["embed_tokens.weight"] = self.embed_weight.detach().cpu().float().contiguous()
        layer_cfg = fm.llama_layer_config(spec, spec.target["max_positions"], V)
        if fmt == "sglang":
            state = {k.replace("layers.0.", "midlayer.", 1): v for k, v in state.items()}
            state["d2t"], state["t2d"] = fm.vocab_maps(ids, V)  # always written (identity offsets for a full one)
            config = {
                **layer_cfg,
                "architectures": ["LlamaForCausalLMEagle3"],
                "num_hidden_layers": 1,
                "draft_vocab_size": Vd,
                "target_hidden_size": spec.target_hidden_size,
                "eagle_config": {
                    "eagle_aux_hidden_state_layer_ids": [i - 1 for i in spec.feature_layers],
                    "use_aux_hidden_state": True,
                },
            }
        else:
            if Vd != V:
                state["d2t"], state["t2d"] = fm.vocab_maps(ids, V)
            t = self.speculators_type
            config = {
                "architectures": [self.speculators_architecture],
                "speculators_model_type": t,
                "speculators_version": "0.9.0",
                "draft_vocab_size": Vd,
                "target_hidden_size": spec.target_hidden_size,
                "eagle_aux_hidden_state_layer_ids": list(spec.feature_layers),
                **dict.fromkeys(fm.EAGLE3_FLAGS, False),
                "embed_requires_grad": False,
                "transformer_layer_config": layer_cfg,
                **self.speculators_extra(state),
                "speculators_config": {
                    "algorithm": t,
                    "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens}],
                    "default_proposal_method": "greedy",
                    "verifier": {"name_or_path": verifier, "architectures": verifier_archs},
                },
                "torch_dtype": "float32",
            }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(out / "model.safetensors"))

    @classmethod
    def detect_format(cls, meta: dict) -> str | None:
        if meta.get("speculators_model_type") == cls.speculators_type:
            return f"speculators-{cls.speculators_type}"
        if "sglang-eagle3" in cls.import_formats and "LlamaForCausalLMEagle3" in (meta.get("architectures") or []):
            return "sglang-eagle3"
        return None

    @classmethod
    def import_format(cls, fmt, path, meta, state, info, embed_weight, head_weight) -> Drafter:
        where = f"drafter {path} ({fmt})"
        L, V = info.num_layers, info.vocab_size
        if fmt.startswith("speculators-"):
            c = meta.get("transformer_layer_config") or {}
            if c.get("model_type", "llama") != "llama":
                raise ModelError(
                    f"{where}: transformer_layer_config.model_type '{c.get('model_type')}' is not implemented by dopd's {cls.kind} (llama layers only)"
                )
            on = [f for f in fm.EAGLE3_FLAGS if meta.get(f, False)]
            if on:
                raise ModelError(
                    f"{where}: {', '.join(f + '=true' for f in on)} is not implemented by dopd's {cls.kind} drafter"
                )
            fm.refuse_unsupported_layer_config(c, where)
            fm.check_target(c, info, where)
            if meta.get("target_hidden_size") not in (None, info.hidden_size):
                raise ModelError(
                    f"{where}: target_hidden_size {meta['target_hidden_size']} vs the target's {info.hidden_size}"
                )
            layers = meta.get("eagle_aux_hidden_state_layer_ids") or cls.default_feature_layers(L, 1)
            Vd = int(meta.get("draft_vocab_size", V))
            body = {k: v for k, v in state.items() if k.startswith(("layers.", "fc.", "norm."))}
        else:
            c = meta
            fm.refuse_unsupported_layer_config(c, where)
            fm.check_target(c, info, where)
            if int(c.get("num_hidden_layers", 1)) != 1:
                raise ModelError(
                    f"{where}: {c['num_hidden_layers']} layers; dopd imports the one-midlayer SGLang EAGLE-3"
                )
            ids = (c.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
            layers = [i + 1 for i in ids] if ids else cls.default_feature_layers(L, 1)
            Vd = int(c.get("draft_vocab_size") or V)
            body = {
                k.replace("midlayer.", "layers.0.", 1): v
                for k, v in state.items()
                if k.startswith(("midlayer.", "fc.", "norm."))
            }
        body.update(cls.import_extra(meta, state, where))
        return fm.finish_import(cls, c, state, info, embed_weight, head_weight, layers, Vd, body, where,
                                cls.import_mask_token_id(meta))  # fmt: skip

    @classmethod
    def import_extra(cls, meta: dict, state: dict, where: str) -> dict:
        """Weights of a subclass's own modules read from a foreign state (none for EAGLE-3)."""
        return {}

    @classmethod
    def import_mask_token_id(cls, meta: dict) -> int | None:
        return None

    def __init__(self, spec: DrafterSpec, embed_weight, head_weight, draft_ids=None):
        super().__init__(spec, embed_weight, head_weight, draft_ids)
        H = spec.hidden_size
        self.fc = nn.Linear(len(spec.feature_layers) * spec.target_hidden_size, H, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(spec, i == 0) for i in range(spec.num_layers)])
        self.norm = RMSNorm(H, spec.rms_eps)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta)

    def context_start(self) -> int:
        return 1  # position 0 has no previous target feature, so its entry does not exist

    # --- shared pieces --------------------------------------------------------------------------------------
    def _ctx_inputs(self, tokens: torch.Tensor, features: torch.Tensor, pos: torch.Tensor):
        """Entry inputs at positions pos [B,T]: (embed(x_p), fc(f_{p-1}))."""
        emb = self.embed(tokens.gather(1, pos))
        f = features.gather(1, (pos - 1).clamp_min(0)[..., None].expand(-1, -1, features.shape[-1]))
        return emb, self.fc(f.to(emb.dtype))

    def _step(
        self,
        emb: torch.Tensor,
        h: torch.Tensor,
        pos: torch.Tensor,
        ctx_k: list[torch.Tensor],
        ctx_v: list[torch.Tensor],
        ctx_mask: torch.Tensor,
        own_k: list[list[torch.Tensor]],
        own_v: list[list[torch.Tensor]],
    ) -> torch.Tensor:
        """One unroll step for M blocks per row: emb,h [B,M,H] at positions pos [B,M]. Appends to own_k/v."""
        for li, layer in enumerate(self.layers):
            x = layer.attn_input(emb, h)[:, :, None]  # [B,M,1,*]
            q = layer.self_attn.q(x).transpose(1, 2)  # [B,h,M,1,d]
            k, v = layer.self_attn.kv(x)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            p = pos[:, None, :, None]
            q, k = self.rotary(q, p), self.rotary(k, p)
            own_k[li].append(k)
            own_v[li].append(v)
            o = grouped_attention(q, ctx_k[li], ctx_v[li], ctx_mask, torch.cat(own_k[li], 3), torch.cat(own_v[li], 3))
            h = layer.finish(o.transpose(1, 2), h[:, :, None])[:, :, 0]
        return h

    # --- training -------------------------------------------------------------------------------------------
    def _context(self, tokens, features, lengths):
        """All context entries of each row at once (causal). Returns pre-norm outputs [B,S,H] and per-layer K/V."""
        B, S = tokens.shape
        dev = tokens.device
        pos = torch.arange(S, device=dev).expand(B, S)
        emb, h = self._ctx_inputs(tokens, features, pos)
        s = torch.arange(S, device=dev)
        key_ok = (s[None, :] >= 1) & (s[None, :] < lengths[:, None])  # [B,S]
        mask = (s[None, :, None] >= s[None, None, :]) & key_ok[:, None, :]
        mask = mask | torch.eye(S, dtype=torch.bool, device=dev)[None]  # every query sees at least itself
        mask = mask[:, None]
        ks, vs = [], []
        for layer in self.layers:
            x = layer.attn_input(emb, h)
            q = layer.self_attn.q(x)
            k, v = layer.self_attn.kv(x)
            q, k = self.rotary(q, pos[:, None]), self.rotary(k, pos[:, None])
            ks.append(k)
            vs.append(v)
            h = layer.finish(causal_attention(q, k, v, mask), h)
        return h, ks, vs

    def _unroll(self, tokens, features, lengths, anchors, K, next_input: Callable[[int, torch.Tensor], torch.Tensor]):
        """Steps 1..K for every block; next_input(j, normed_h_j) gives the token fed to step j+1."""
        h_ctx, ks, vs = self._context(tokens, features, lengths)
        B, S = tokens.shape
        a = anchors.clamp(min=1)
        h = h_ctx.gather(1, (a - 1)[..., None].expand(-1, -1, h_ctx.shape[-1]))  # step 1: entry at a-1
        s = torch.arange(S, device=tokens.device)
        ctx_mask = (s[None, None, :] >= 1) & (s[None, None, :] <= (a - 1)[..., None])
        ctx_mask = ctx_mask | (s[None, None, :] == 0) & (anchors[..., None] < 2)  # padding blocks: see something
        outs = [self.norm(h)]
        own_k = [[] for _ in self.layers]
        own_v = [[] for _ in self.layers]
        for j in range(2, K + 1):
            emb = self.embed(next_input(j - 1, outs[-1]))
            h = self._step(emb, h, a + j - 2, ks, vs, ctx_mask, own_k, own_v)
            outs.append(self.norm(h))
        if K >= 1:
            next_input(K, outs[-1])
        return torch.stack(outs, dim=2)  # [B,M,K,H]

    def block_hidden(self, tokens, features, lengths, anchors, block_tokens):
        K = block_tokens.shape[-1]
        return self._unroll(tokens, features, lengths, anchors, K, lambda j, h: block_tokens[:, :, j - 1])

    @torch.no_grad()
    def draft_blocks(self, tokens, features, lengths, anchors, K, temperature=0.0, generator=None):
        drafted, logps, qs = [], [], []

        def pick(j, h):
            B, M, H = h.shape
            ids, _, qt, lp, _ = self._sample(self.logits(h).reshape(B * M, -1), temperature, 1.0, generator)
            drafted.append(ids.view(B, M))
            logps.append(lp.view(B, M))
            qs.append(qt.view(B, M))
            return drafted[-1]

        self._unroll(tokens, features, lengths, anchors, K, pick)
        return torch.stack(drafted, -1), torch.stack(logps, -1), torch.stack(qs, -1)

    # --- inference ------------------------------------------------------------------------------------------
    def new_state(self, batch, max_len, device, dtype) -> DraftState:
        shape = (batch, self.spec.num_kv_heads, max_len, self.spec.head_dim)
        ks = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        vs = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        return DraftState(ks, vs, torch.full((batch,), self.context_start(), dtype=torch.long, device=device))

    def _extend(self, state, rows, tokens, features, lengths):
        """The inference context pass: add the entries new since the last call to the cache of slots `rows` and
        return (pre-norm output of the entry at n-1 [b,1,H], per-layer context K/V [b,Hkv,n,d] in its dtype, the
        context mask [b,1,n] of a block anchored at a = n, a [b,1])."""
        dev = tokens.device
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        tok, feat, n = sel(tokens), sel(features), sel(lengths)
        c = sel(state.ctx_end).clone()
        T = int((n - c).max())
        pos = c[:, None] + torch.arange(T, device=dev)[None]  # new entries p in [c, n-1], padded to T
        valid = pos < n[:, None]
        wpos = torch.where(valid, pos, state.k[0].shape[2] - 1)  # padding writes go to the spare last slot
        emb, h = self._ctx_inputs(tok, feat, pos.clamp(max=tok.shape[1] - 1))
        kv_len = int((n - 1).max()) + 1
        s = torch.arange(kv_len, device=dev)
        mask = ((s[None, None, :] <= pos[..., None]) & (s[None, None, :] >= 1))[:, None]
        rr = torch.arange(tok.shape[0], device=dev) if rows is None else rows
        ks, vs = [], []
        for li, layer in enumerate(self.layers):
            x = layer.attn_input(emb, h)
            q = layer.self_attn.q(x)
            k, v = layer.self_attn.kv(x)
            q, k = self.rotary(q, pos[:, None]), self.rotary(k, pos[:, None])
            state.k[li][rr[:, None], :, wpos] = k.transpose(1, 2).to(state.k[li].dtype)
            state.v[li][rr[:, None], :, wpos] = v.transpose(1, 2).to(state.v[li].dtype)
            kc, vc = sel(state.k[li])[:, :, :kv_len], sel(state.v[li])[:, :, :kv_len]
            ks.append(kc)
            vs.append(vc)
            h = layer.finish(causal_attention(q, kc.to(q.dtype), vc.to(q.dtype), mask), h)
        state.ctx_end[rr] = n
        last = (n - 1 - c)[:, None, None].expand(-1, 1, h.shape[-1])
        h = h.gather(1, last)  # [b,1,H] step 1 (entry at n-1)
        a = n[:, None]
        ctx_mask = (s[None, None, :] >= 1) & (s[None, None, :] <= (a - 1)[..., None])
        return h, [k.to(h.dtype) for k in ks], [v.to(h.dtype) for v in vs], ctx_mask, a

    @torch.no_grad()
    def propose(
        self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None
    ) -> Proposal:
        h, ks, vs, ctx_mask, a = self._extend(state, rows, tokens, features, lengths)
        own_k = [[] for _ in self.layers]
        own_v = [[] for _ in self.layers]

        def advance(tok, h, j):
            return self._step(self.embed(tok[:, None]), h, a + j - 2, ks, vs, ctx_mask, own_k, own_v)

        return self._chain(h, K, advance, lambda h: self.logits(self.norm(h[:, 0])), temperature, top_p, generator)
