"""The target's forward over the slot KV cache: what the engine calls once per prefill and once per verification.

Two implementations of one contract (`TargetForward.__call__`):
- `HFForward` drives the Hugging Face modules: the reference, for every supported architecture.
- `LeanForward` computes the same Llama-family layer (llama, qwen2, qwen3, mistral) with fewer hops: q/k/v and
  gate/up each fused into one matmul over one weight, the weights prepacked once for oneDNN where the CPU computes
  in bf16/fp16, SDPA over the used part of the cache, and HF's own norm, rotary and activation modules (so the
  arithmetic of each piece is HF's). Why: at decode shapes (1 to K+1 tokens for each of a few to a few hundred
  rows) the per-module dispatch of HF and oneDNN's reorder of every weight on every call cost as much as the
  arithmetic; `bench/engine_throughput.py` prints the gain of each technique against the path without it.

Both return the logits of every fed position (when asked) and the target features the drafter reads: HF's
`hidden_states[i]` is the input of layer i (index 0 = the embeddings) and index L the final normed state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kvcache import SlotCache

LEAN_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ForwardOut:
    logits: torch.Tensor | None  # [b, T, V] in the model's dtype
    features: torch.Tensor | None  # [b, T, len(layers) * H], hidden_states[i] for i in the feature layers, concatenated
    last_hidden: torch.Tensor  # [b, T, H] the final normed state (the LM head's input)


def attention_mask(pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[b, 1, T, kv_len] bool: query at position p sees slots <= p (per-row positions, the slot cache's layout)."""
    return (torch.arange(kv_len, device=pos.device)[None, None, :] <= pos[..., None])[:, None]


class TargetForward:
    """One forward of `ids` [b, T] at positions `pos` [b, T] for cache rows `rows` (None = all rows), attending to
    cache slots < kv_len; K/V of the fed tokens are written at their positions. `cache=None`: a teacher-forced
    prefill that keeps no K/V (`pos` must then be 0..T-1 and kv_len T)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def __call__(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        cache: SlotCache,
        rows: torch.Tensor | None,
        kv_len: int,
        feature_layers: list[int] | None = None,
        want_logits: bool = True,
        causal: bool = False,
    ) -> ForwardOut:
        """`causal`: the caller promises pos = 0..T-1 in every row and kv_len = T (a prefill from the start), so
        attention may use the causal kernel instead of the explicit mask (same result, faster)."""
        raise NotImplementedError


class HFForward(TargetForward):
    """The Hugging Face modules themselves (the reference path; always the explicit mask)."""

    def __call__(
        self, ids, pos, cache, rows, kv_len, feature_layers=None, want_logits=True, causal=False
    ) -> ForwardOut:
        if cache is not None:
            cache.prepare(rows, pos, kv_len)
        need_hidden = bool(feature_layers)
        out = self.model.model(
            input_ids=ids, attention_mask=attention_mask(pos, kv_len), position_ids=pos, cache=cache,
            use_cache=cache is not None, output_hidden_states=need_hidden,
        )  # fmt: skip
        feats = torch.cat([out.hidden_states[i] for i in feature_layers], dim=-1) if need_hidden else None
        logits = self.model.lm_head(out.last_hidden_state) if want_logits else None
        return ForwardOut(logits, feats, out.last_hidden_state)


def _packable(weight: torch.Tensor) -> bool:
    """oneDNN's prepacked linear pays off for reduced precision on a CPU that computes it natively."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        ok = (
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
            if weight.dtype == torch.bfloat16
            else torch.ops.mkldnn._is_mkldnn_fp16_supported()
        )
        return bool(ok) and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


class Linear:
    """y = x W^T (+ b) with W reordered once into oneDNN's blocked layout where that is faster (CPU bf16/fp16),
    else a plain `F.linear` over the same (fused) weight."""

    PACK_HINT = 64  # oneDNN's batch hint: measured best from 1 to 256 rows on this CPU (bench/engine_throughput.py)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.out_features = weight.shape[0]
        self.bias = bias
        self.packed = None
        self.weight = weight.contiguous()
        if pack and _packable(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.PACK_HINT)
            self.weight = None  # only the packed copy is kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)


def _fused(*linears: torch.nn.Linear, pack: bool = True) -> Linear:
    """One Linear over the stacked weights of `linears` (same input). Where the result is not prepacked, the HF
    modules' weights become views into the fused weight, so fusing costs no memory and both paths share it."""
    w = torch.cat([m.weight.detach() for m in linears])
    b = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    fused = Linear(w, b, pack)
    if fused.weight is not None:
        at = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = fused.weight[at : at + n]
            if b is not None:
                m.bias.data = fused.bias[at : at + n]
            at += n
    return fused


class LeanCore(torch.nn.Module):
    """The lean step over the slot cache as one module, for `torch.compile` (common/compile.py): the fused weights
    as parameters (so inductor's freezing folds and prepacks them), the cache tensors as inputs written in place.
    Same arithmetic as `LeanForward.__call__` (HF's norm, rotary and activation modules)."""

    def __init__(self, lean: LeanForward):
        super().__init__()
        inner = lean.inner
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.rope = lean.rope
        self.d, self.H, self.Hkv = lean.head_dim, lean.heads, lean.kv_heads
        self.layers = torch.nn.ModuleList()
        for w in lean.layers:
            m = torch.nn.Module()
            m.ln1, m.ln2, m.act = w["ln1"], w["ln2"], w["act"]
            m.q_norm, m.k_norm = w["q_norm"], w["k_norm"]
            for name in ("qkv", "o", "gate_up", "down"):
                lin = w[name]
                if lin.weight is None:
                    raise ValueError("LeanCore needs the plain (unpacked) weights: build LeanForward with pack=False")
                setattr(m, f"{name}_w", torch.nn.Parameter(lin.weight, requires_grad=False))
                setattr(m, f"{name}_b", None if lin.bias is None else torch.nn.Parameter(lin.bias, requires_grad=False))
            m.scaling = w["scaling"]
            self.layers.append(m)
        self.head_w = torch.nn.Parameter(lean.head.weight, requires_grad=False)

    def forward(self, ids, pos, mask, rows, slots, kv_len: int, Ks: list, Vs: list, want: tuple, want_logits: bool):
        """`want`: one bool per hidden state 0..L (bools, not layer indices: dynamo treats ints as symbols and
        `i in (ints)` then misjudges; bools are specialised, so each feature set gets its own graph)."""
        b, T = ids.shape
        d, H, Hkv = self.d, self.H, self.Hkv
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=pos)
        feats = []
        for i, m in enumerate(self.layers):
            if want[i]:
                feats.append(h)
            x = m.ln1(h)
            q, k, v = F.linear(x, m.qkv_w, m.qkv_b).split([H * d, Hkv * d, Hkv * d], dim=-1)
            q, k, v = q.view(b, T, H, d), k.view(b, T, Hkv, d), v.view(b, T, Hkv, d)
            if m.q_norm is not None:
                q, k = m.q_norm(q), m.k_norm(k)
            q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            K, V = Ks[i], Vs[i]
            r = torch.arange(K.shape[0], device=K.device) if rows is None else rows
            K[r[:, None], :, slots] = k.transpose(1, 2).to(K.dtype)
            V[r[:, None], :, slots] = v.to(V.dtype)
            if rows is None:
                Kr, Vr = K[:, :, :kv_len], V[:, :, :kv_len]
            else:
                Kr, Vr = K[:, :, :kv_len].index_select(0, rows), V[:, :, :kv_len].index_select(0, rows)
            att = F.scaled_dot_product_attention(q, Kr, Vr, attn_mask=mask, scale=m.scaling, enable_gqa=Hkv != H)
            h = h + F.linear(att.transpose(1, 2).reshape(b, T, H * d), m.o_w, m.o_b)
            x = m.ln2(h)
            gate, up = F.linear(x, m.gate_up_w, m.gate_up_b).chunk(2, dim=-1)
            h = h + F.linear(m.act(gate) * up, m.down_w, m.down_b)
        last = self.norm(h)
        if want[len(self.layers)]:
            feats.append(last)
        logits = F.linear(last, self.head_w) if want_logits else None
        return logits, (torch.cat(feats, dim=-1) if feats else None), last


class LeanForward(TargetForward):
    """The Llama-family layer with fused, prepacked weights (see the module docstring). `compile="on"`: decode and
    verification steps (not the causal prefill, whose shapes vary with every prompt) run `LeanCore` through
    `torch.compile` (common/compile.py); the weights are then left unpacked for inductor to pack."""

    def __init__(self, model: torch.nn.Module, pack: bool = True, compile: str = "off"):
        super().__init__(model)
        if compile not in ("on", "off"):
            raise ValueError(
                f"LeanForward compile must be on or off (auto is decided by common/compile.py), got {compile!r}"
            )
        pack = pack and compile == "off"
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cfg = model.config
        if cfg.model_type not in LEAN_ARCHITECTURES:
            raise ValueError(f"no lean forward for '{cfg.model_type}' (supported: {', '.join(LEAN_ARCHITECTURES)})")
        if (
            getattr(cfg, "sliding_window", None)
            and getattr(cfg, "use_sliding_window", True)
            and cfg.model_type != "llama"
        ):
            raise ValueError(f"no lean forward for a sliding-window {cfg.model_type} (window {cfg.sliding_window})")
        self.rope = apply_rotary_pos_emb
        self.inner = model.model
        self.layers = []
        for layer in self.inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm,
                    q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
                    qkv=_fused(a.q_proj, a.k_proj, a.v_proj, pack=pack), o=Linear(a.o_proj.weight.detach(), a.o_proj.bias, pack),
                    gate_up=_fused(m.gate_proj, m.up_proj, pack=pack), down=Linear(m.down_proj.weight.detach(), m.down_proj.bias, pack),
                    act=m.act_fn, scaling=a.scaling,
                )
            )  # fmt: skip
        a0 = self.inner.layers[0].self_attn
        self.head_dim = a0.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head = Linear(model.lm_head.weight.detach(), pack=pack)
        self._compiled = None
        if compile == "on":
            from .compile import compile_step

            self.core = LeanCore(self)
            self._compiled = compile_step(self.core, model.lm_head.weight.device)

    @torch.no_grad()
    def __call__(
        self, ids, pos, cache, rows, kv_len, feature_layers=None, want_logits=True, causal=False
    ) -> ForwardOut:
        if cache is not None:
            cache.prepare(rows, pos, kv_len)
        if self._compiled is not None and cache is not None and not causal:
            want = tuple(sorted(set(feature_layers or ())))
            flags = tuple(i in want for i in range(self.num_layers + 1))
            logits, feats, last = self._compiled(
                ids, pos, attention_mask(pos, kv_len), rows, pos, kv_len, cache.k, cache.v, flags, want_logits
            )
            if feature_layers and list(want) != list(feature_layers):  # the caller's order (and repeats)
                H = last.shape[-1]
                by = {i: feats[..., j * H : (j + 1) * H] for j, i in enumerate(want)}
                feats = torch.cat([by[i] for i in feature_layers], dim=-1)
            return ForwardOut(logits, feats, last)
        b, T = ids.shape
        d, H, Hkv = self.head_dim, self.heads, self.kv_heads
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, position_ids=pos)
        mask = None if causal else attention_mask(pos, kv_len)
        want = set(feature_layers or ())
        feats = {}
        for i, w in enumerate(self.layers):
            if i in want:
                feats[i] = h
            x = w["ln1"](h)
            q, k, v = w["qkv"](x).split([H * d, Hkv * d, Hkv * d], dim=-1)
            q, k, v = q.view(b, T, H, d), k.view(b, T, Hkv, d), v.view(b, T, Hkv, d)
            if w["q_norm"] is not None:
                q, k = w["q_norm"](q), w["k_norm"](k)
            q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = v.transpose(1, 2)
            K, V = cache.write_and_read(i, k, v) if cache is not None else (k, v)
            att = F.scaled_dot_product_attention(
                q, K, V, attn_mask=mask, is_causal=causal, scale=w["scaling"], enable_gqa=Hkv != H
            )
            h = h + w["o"](att.transpose(1, 2).reshape(b, T, H * d))
            x = w["ln2"](h)
            gate, up = w["gate_up"](x).chunk(2, dim=-1)
            h = h + w["down"](w["act"](gate) * up)
        last = self.inner.norm(h)
        if self.num_layers in want:
            feats[self.num_layers] = last
        features = torch.cat([feats[i] for i in feature_layers], dim=-1) if feature_layers else None
        return ForwardOut(self.head(last) if want_logits else None, features, last)


def forward_for(model: torch.nn.Module, kind: str = "auto", compiled: bool = False) -> TargetForward:
    """`kind`: "hf" (reference), "lean", or "auto" (lean where the architecture has one, else HF); `compiled`: the
    lean forward's steps through torch.compile."""
    if kind not in ("auto", "hf", "lean"):
        raise ValueError(f"unknown target forward '{kind}' (auto | hf | lean)")
    if kind == "hf" or (kind == "auto" and model.config.model_type not in LEAN_ARCHITECTURES):
        return HFForward(model)
    return LeanForward(model, compile="on" if compiled else "off")


def measure_steps(target, batches=(1, 16), steps: int = 5) -> tuple[dict[int, float], dict[int, float]]:
    """Best-of-`steps` seconds of one plain decode step at each row count, eager lean vs compiled lean."""
    cfg = target.model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dev = target.device
    out = ({}, {})
    fwds = (LeanForward(target.model), LeanForward(target.model, compile="on"))
    L = 64
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, L), generator=torch.Generator().manual_seed(0)).to(dev)
        for which, fwd in enumerate(fwds):
            cache = SlotCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, d, L + 8, dev, target.dtype)
            fwd(ids[:, :-1], torch.arange(L - 1, device=dev).expand(b, L - 1), cache, None, L - 1, causal=True)
            pos = torch.full((b, 1), L - 1, device=dev)
            best = float("inf")
            for _ in range(steps + 2):
                t0 = time.perf_counter()
                fwd(ids[:, -1:], pos, cache, None, L)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best = min(best, time.perf_counter() - t0)
            out[which][b] = best
    return out
