"""A static per-slot KV cache for a Hugging Face target, written at per-row positions.

Why not HF's DynamicCache/StaticCache: in batched speculative decoding every row accepts a different number of
tokens, so rows sit at different lengths. HF caches append the same count for the whole batch, leaving holes.
Here row b's position t always lives in slot t: a verification step writes its K+1 tokens at that row's own
slots, the rejected tail is simply overwritten next step, and a 4D mask (slot <= query position) keeps attention
exact. Rows can be (re)filled independently (continuous batching) by forwarding a subset of rows.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, owner: SlotCache, idx: int):
        super().__init__()
        self.owner, self.idx = owner, idx

    def lazy_initialization(self, key_states, value_states):  # storage is allocated by the owner
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write_and_read(self.idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """K/V storage [B, Hkv, S, d] per layer. Before each forward call `prepare(rows, slots)`."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, device, dtype):
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.rows: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.kv_len = 0

    def prepare(self, rows: torch.Tensor | None, slots: torch.Tensor, kv_len: int) -> None:
        """The next forward writes its token i of row r at slots[r, i] and reads slots [0, kv_len)."""
        if int(slots.max()) >= self.max_len:
            raise ValueError(f"KV slot {int(slots.max())} beyond the cache ({self.max_len})")
        self.rows, self.slots, self.kv_len = rows, slots, kv_len

    def write_and_read(self, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, V = self.k[idx], self.v[idx]
        r = torch.arange(K.shape[0], device=K.device) if self.rows is None else self.rows
        K[r[:, None], :, self.slots] = k.transpose(1, 2).to(K.dtype)
        V[r[:, None], :, self.slots] = v.transpose(1, 2).to(V.dtype)
        if self.rows is None:
            return K[:, :, : self.kv_len], V[:, :, : self.kv_len]
        return K[:, :, : self.kv_len].index_select(0, self.rows), V[:, :, : self.kv_len].index_select(0, self.rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len
