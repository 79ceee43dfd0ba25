"""DFlash style drafter: one parallel forward drafts a whole block, conditioned on the target's context features.

The block for a prefix of length a is [x_{a-1}, MASK x K] at positions a-1 .. a-1+K; slot i (1..K) predicts the
token at its own position a-1+i (no shift), so one forward gives K draft tokens. Inside the block attention is
bidirectional; every layer also attends to the context: the fused target features of positions < a-1 (the last
committed token's own feature is not known yet at inference), projected by that layer's own k/v projections
(KV injection). Context K/V are cached across verification steps; the block's K/V are recomputed each step.
Deviation from the public DFlash code: the MASK input is a learned vector (initialised from a token embedding)
rather than a reserved vocabulary row, so no unused token id is needed.

Formats (written and read here; facts in formats.py): `speculators` / `vllm` = the z-lab `DFlashDraftModel` layout
(vLLM; speculators converts it), with dopd's learned MASK as `mask_embedding.pt`; `sglang` = the same without head
and MASK file (only a drafter whose MASK is still an embedding row and whose head is the target's fits).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ModelError
from . import formats as fm
from .base import Drafter, DrafterSpec, DraftState, Proposal, register_kind
from .layers import Attention, RMSNorm, Rotary, SwiGLU, grouped_attention


class MaskVector(nn.Module):
    """The learned MASK input. A module (not a bare Parameter) so ZeRO-3 gathers it when it is used."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return self.weight


class DFlashLayer(nn.Module):
    def __init__(self, spec: DrafterSpec):
        super().__init__()
        H = spec.hidden_size
        self.input_layernorm = RMSNorm(H, spec.rms_eps)
        self.self_attn = Attention(H, H, spec.num_heads, spec.num_kv_heads, spec.head_dim, True, spec.rms_eps)
        self.post_attention_layernorm = RMSNorm(H, spec.rms_eps)
        self.mlp = SwiGLU(H, spec.intermediate_size)


@register_kind
class DFlashDrafter(Drafter):
    """Defaults: one draft layer reads the output of target layer L//2, n layers n outputs evenly spread over layers
    1..L-3; SFT = blocks of K at random answer anchors (at most `loss.dflash_anchors_per_seq` per sequence), position
    j weighted exp(-(j-1)/`loss.dflash_decay`) (SpecForge's example uses 7 for 16-token blocks [docs/recipes.md
    R19]; dopd's default: unset, flat weights); the official Draft-OPD recipe for DFlash [docs/recipes.md R4, R5,
    R7]: the rollout's blocks, accepted stream = Bernoulli forward KL on the target's token, rejected stream = k3 on
    the drafted tokens (lambda 1)."""

    kind = "dflash"
    default_loss = {"objective": "opd", "response": "blocks", "acc_divergence": "bernoulli", "lambda_rej": 1.0}
    export_formats = ("speculators", "vllm", "sglang")
    import_formats = ("vllm-dflash",)

    @classmethod
    def default_feature_layers(cls, num_target_layers: int, num_draft_layers: int) -> list[int]:
        L = num_target_layers
        if num_draft_layers == 1:
            return [L // 2 + 1]
        return [round(1 + i * (L - 4) / (num_draft_layers - 1)) + 1 for i in range(num_draft_layers)]

    @classmethod
    def sft_step_weights(cls, cfg) -> torch.Tensor:
        j = torch.arange(cls.sft_depth(cfg), dtype=torch.float32)
        return torch.ones_like(j) if cfg.loss.dflash_decay is None else torch.exp(-j / cfg.loss.dflash_decay)

    @classmethod
    def sft_anchors(cls, rec, cfg, rng) -> np.ndarray:
        span = np.arange(max(rec.prompt_len, 1), rec.token_ids.shape[0], dtype=np.int64)
        if span.size > cfg.loss.dflash_anchors_per_seq:
            span = np.sort(rng.choice(span, size=cfg.loss.dflash_anchors_per_seq, replace=False))
        return span

    def configure_training(self, cfg) -> None:
        if not cfg.train_mask:  # a fixed MASK input, as the official [docs/recipes.md R8] frozen embedding row
            self.mask_embedding.weight.requires_grad_(False)

    # --- formats --------------------------------------------------------------------------------------------
    def check_export(self, fmt: str) -> None:
        """SGLang's DFlash uses the target's embedding and head and the embedding row of mask_token_id as the MASK:
        only a drafter whose MASK vector is still exactly that row, with the target's full head, fits."""
        if fmt != "sglang":
            return
        spec = self.spec
        mask = self.mask_embedding.weight.detach().cpu().float()
        row = self.embed_weight[spec.mask_token_id].detach().cpu().float() if spec.mask_token_id is not None else None
        if row is None or not torch.equal(mask, row):
            raise ModelError(
                "SGLang cannot represent this DFlash drafter: its MASK input is a learned vector (mask_embedding) and "
                "SGLang's DFlash takes the mask from the target embedding row of mask_token_id; export with --format vllm"
            )
        if self.lm_head is not None:
            raise ModelError(
                "SGLang cannot represent this DFlash drafter: it has its own LM head (reduced vocabulary or "
                "train_lm_head) and SGLang's DFlash always uses the target's head; export with --format vllm"
            )

    def export(self, fmt, out, verifier, verifier_archs, speculative_tokens) -> None:
        spec = self.spec
        with_mask_file = fmt != "sglang"
        ids, head, _ = fm.vocab_tensors(self)
        V, Vd = spec.vocab_size, ids.numel()
        state = {k: v for k, v in fm.module_state(self).items() if k != "mask_embedding.weight"}
        if with_mask_file or self.lm_head is not None:
            state["lm_head.weight"] = head.contiguous()
        if Vd != V:
            state["d2t"] = fm.vocab_maps(ids, V)[0]
        cfg = {
            **fm.llama_layer_config(spec, spec.target["max_positions"], V),
            "model_type": "qwen3",
            "architectures": ["DFlashDraftModel"],
            "draft_vocab_size": Vd,
            "block_size": speculative_tokens + 1,
            "num_target_layers": spec.target["num_layers"],
            "dflash_config": {
                "mask_token_id": spec.mask_token_id if spec.mask_token_id is not None else 0,
                "target_layer_ids": [i - 1 for i in spec.feature_layers],
            },
        }
        cfg.pop("rope_scaling")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(state, str(out / "model.safetensors"))
        if with_mask_file:
            torch.save(self.mask_embedding.weight.detach().cpu().float().clone(), out / "mask_embedding.pt")

    @classmethod
    def detect_format(cls, meta: dict) -> str | None:
        if "DFlashDraftModel" in (meta.get("architectures") or []) or "dflash_config" in meta:
            return "vllm-dflash"
        return None

    @classmethod
    def import_format(cls, fmt, path, meta, state, info, embed_weight, head_weight) -> Drafter:
        where = f"drafter {path} ({fmt})"
        V = info.vocab_size
        c = meta
        fm.refuse_unsupported_layer_config(c, where)
        fm.check_target(c, info, where)
        dc = c.get("dflash_config") or {}
        if "target_layer_ids" not in dc:
            raise ModelError(f"{where}: dflash_config.target_layer_ids is missing")
        layers = [i + 1 for i in dc["target_layer_ids"]]
        Vd = int(c.get("draft_vocab_size") or V)
        body = {k: v for k, v in state.items() if k.startswith(("layers.", "fc.", "norm.", "hidden_norm."))}
        mask_file = path / "mask_embedding.pt"
        mtid = dc.get("mask_token_id")
        if mask_file.is_file():
            mask = torch.load(mask_file, map_location="cpu", weights_only=True).float().flatten()
        elif mtid is not None and 0 <= int(mtid) < V:
            mask = embed_weight[int(mtid)].detach().cpu().float()  # z-lab: the MASK is an embedding row
        else:
            raise ModelError(f"{where}: neither mask_embedding.pt nor a valid dflash_config.mask_token_id ({mtid})")
        if mask.numel() != info.hidden_size:
            raise ModelError(
                f"{where}: mask embedding has {mask.numel()} values, the target's hidden size is {info.hidden_size}"
            )
        body["mask_embedding.weight"] = mask
        return fm.finish_import(cls, c, state, info, embed_weight, head_weight, layers, Vd, body, where, mtid)

    def __init__(self, spec: DrafterSpec, embed_weight, head_weight, draft_ids=None):
        super().__init__(spec, embed_weight, head_weight, draft_ids)
        H = spec.hidden_size
        self.fc = nn.Linear(len(spec.feature_layers) * spec.target_hidden_size, H, bias=False)
        self.hidden_norm = RMSNorm(H, spec.rms_eps)
        self.layers = nn.ModuleList([DFlashLayer(spec) for _ in range(spec.num_layers)])
        self.norm = RMSNorm(H, spec.rms_eps)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta)
        with torch.no_grad():
            if spec.mask_token_id is not None:
                init = embed_weight[spec.mask_token_id].float()
            else:
                init = embed_weight.float().mean(0)
        self.mask_embedding = MaskVector(init)

    def context_start(self) -> int:
        return 0

    def _ctx_kv(self, features: torch.Tensor, pos: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer context K/V [B,Hkv,T,d] for features [B,T,F] at positions pos [B,T]."""
        c = self.hidden_norm(self.fc(features.to(self._dtype())))
        ks, vs = [], []
        for layer in self.layers:
            k, v = layer.self_attn.kv(c)
            ks.append(self.rotary(k, pos[:, None]))
            vs.append(v)
        return ks, vs

    def _blocks(self, last_tok: torch.Tensor, anchors: torch.Tensor, K: int, ks, vs, ctx_mask) -> torch.Tensor:
        """Block forward for M blocks per row: last_tok [B,M] at anchors-1. Returns normed hidden [B,M,K,H]."""
        B, M = last_tok.shape
        first = self.embed(last_tok)[:, :, None]
        x = torch.cat([first, self.mask_embedding().to(first.dtype).expand(B, M, K, -1)], dim=2)  # [B,M,K+1,H]
        pos = (anchors - 1).clamp_min(0)[..., None] + torch.arange(K + 1, device=x.device)  # [B,M,K+1]
        for li, layer in enumerate(self.layers):
            xn = layer.input_layernorm(x)
            q = layer.self_attn.q(xn).transpose(1, 2)  # [B,h,M,T,d]
            k, v = layer.self_attn.kv(xn)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            q, k = self.rotary(q, pos[:, None]), self.rotary(k, pos[:, None])
            o = grouped_attention(q, ks[li].to(q.dtype), vs[li].to(q.dtype), ctx_mask, k, v)
            x = x + layer.self_attn.out(o.transpose(1, 2))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x[:, :, 1:])

    # --- training -------------------------------------------------------------------------------------------
    def _train_blocks(self, tokens, features, lengths, anchors, K):
        B, S = tokens.shape
        pos = torch.arange(S, device=tokens.device).expand(B, S)
        ks, vs = self._ctx_kv(features, pos)
        s = torch.arange(S, device=tokens.device)
        ctx_mask = s[None, None, :] < (anchors - 1)[..., None]  # features of positions < a-1
        last = tokens.gather(1, (anchors - 1).clamp_min(0))
        return self._blocks(last, anchors, K, ks, vs, ctx_mask)

    def block_hidden(self, tokens, features, lengths, anchors, block_tokens):
        return self._train_blocks(tokens, features, lengths, anchors, block_tokens.shape[-1])

    @torch.no_grad()
    def draft_blocks(self, tokens, features, lengths, anchors, K, temperature=0.0, generator=None):
        return self._sample_blocks(self._train_blocks(tokens, features, lengths, anchors, K), temperature, generator)

    # --- inference ------------------------------------------------------------------------------------------
    def new_state(self, batch, max_len, device, dtype) -> DraftState:
        shape = (batch, self.spec.num_kv_heads, max_len, self.spec.head_dim)
        ks = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        vs = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        return DraftState(ks, vs, torch.zeros(batch, dtype=torch.long, device=device))

    @torch.no_grad()
    def propose(
        self, state, rows, tokens, features, lengths, K, temperature=0.0, top_p=1.0, generator=None
    ) -> Proposal:
        dev = tokens.device
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        tok, feat, n = sel(tokens), sel(features), sel(lengths)
        c = sel(state.ctx_end).clone()
        rr = torch.arange(tok.shape[0], device=dev) if rows is None else rows
        T = int((n - 1 - c).max())
        if T > 0:  # new context features t in [c, n-2]
            pos = c[:, None] + torch.arange(T, device=dev)[None]
            valid = pos < (n - 1)[:, None]
            wpos = torch.where(valid, pos, state.k[0].shape[2] - 1)
            f = feat.gather(1, pos.clamp(max=feat.shape[1] - 1)[..., None].expand(-1, -1, feat.shape[-1]))
            ks, vs = self._ctx_kv(f, pos)
            for li in range(len(self.layers)):
                state.k[li][rr[:, None], :, wpos] = ks[li].transpose(1, 2).to(state.k[li].dtype)
                state.v[li][rr[:, None], :, wpos] = vs[li].transpose(1, 2).to(state.v[li].dtype)
        state.ctx_end[rr] = n - 1
        kv_len = max(int((n - 1).max()), 1)
        ks = [sel(k)[:, :, :kv_len] for k in state.k]
        vs = [sel(v)[:, :, :kv_len] for v in state.v]
        s = torch.arange(kv_len, device=dev)
        a = n[:, None]
        ctx_mask = s[None, None, :] < (a - 1)[..., None]
        h = self._blocks(tok.gather(1, a - 1), a, K, ks, vs, ctx_mask)[:, 0]  # [b,K,H]
        b = h.shape[0]
        ids, qf, qt, lp, _ = self._sample(self.logits(h).reshape(b * K, -1), temperature, top_p, generator)
        q = qf.view(b, K, -1) if qf is not None else None
        return Proposal(ids.view(b, K), q, qt.view(b, K), lp.view(b, K))
