"""Small transformer pieces the drafters are built from.

Drafters are written out by hand (not as HF modules) because both their training forward and their inference
forward need attention over an explicit "context + own block" key set, and the two must be the same computation:
`grouped_attention` is that one computation, used by training (many blocks per sequence at once) and by
inference (one block per sequence, cached context).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    """Rotary position embedding (the Llama convention: halves rotated, cos/sin duplicated)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x` [..., T, d] (heads in a leading dim) at integer `positions` [B, ..., T] broadcastable."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
        return x * cos + rot * sin


def repeat_kv(x: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B,Hq,T,d]; k,v [B,Hkv,S,d]; mask bool [B,1,T,S] (True = may attend). Every query must see a key."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def grouped_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    ctx_mask: torch.Tensor,
    k_own: torch.Tensor | None,
    v_own: torch.Tensor | None,
    own_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of grouped queries over a shared context plus each group's own keys.

    q:        [B, Hq, M, T, d]   M groups (blocks) of T queries
    k_ctx:    [B, Hkv, S, d]     shared context keys (and v_ctx)
    ctx_mask: [B, M, S] bool     which context keys group m may see (e.g. positions before its anchor)
    k_own:    [B, Hkv, M, U, d]  keys private to group m (its earlier draft steps, or its whole block)
    own_mask: [T, U] bool        which own keys query t may see (None = all)

    This is the EAGLE-3 training-time-test attention (own keys = the block's earlier unroll steps) and the DFlash
    block attention (own keys = the whole block, bidirectional); at inference M = 1 per sequence. Cost is
    O(M*T*(S+U)), never O((M*T)^2), so thousands of blocks per sequence stay cheap.
    """
    B, Hq, M, T, d = q.shape
    groups = Hq // k_ctx.shape[1]
    scale = 1.0 / math.sqrt(d)
    kc = repeat_kv(k_ctx, groups)
    vc = repeat_kv(v_ctx, groups)
    s_ctx = torch.einsum("bhmtd,bhsd->bhmts", q, kc) * scale
    s_ctx = s_ctx.masked_fill(~ctx_mask[:, None, :, None, :], float("-inf"))
    if k_own is None:
        w = torch.softmax(s_ctx.float(), dim=-1).to(q.dtype)
        return torch.einsum("bhmts,bhsd->bhmtd", w, vc)
    ko = repeat_kv(k_own, groups)
    vo = repeat_kv(v_own, groups)
    s_own = torch.einsum("bhmtd,bhmud->bhmtu", q, ko) * scale
    if own_mask is not None:
        s_own = s_own.masked_fill(~own_mask, float("-inf"))
    S = s_ctx.shape[-1]
    w = torch.softmax(torch.cat([s_ctx, s_own], dim=-1).float(), dim=-1).to(q.dtype)
    return torch.einsum("bhmts,bhsd->bhmtd", w[..., :S], vc) + torch.einsum("bhmtu,bhmud->bhmtd", w[..., S:], vo)


class Attention(nn.Module):
    """Projections of one drafter attention layer; the attention itself is done by the caller's function."""

    def __init__(self, in_dim: int, hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(in_dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[..., T, n*d] -> [..., n, T, d] with heads moved before T."""
        x = x.unflatten(-1, (n, self.head_dim))
        return x.transpose(-2, -3)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        q = self.split(self.q_proj(x), self.heads)
        return self.q_norm(q) if self.q_norm is not None else q

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.split(self.k_proj(x), self.kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, self.split(self.v_proj(x), self.kv_heads)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """[..., H, T, d] -> [..., T, hidden]."""
        return self.o_proj(o.transpose(-2, -3).flatten(-2))
