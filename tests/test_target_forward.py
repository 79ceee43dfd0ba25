"""The lean target forward computes what the Hugging Face modules compute: same logits and features, same cache."""

from __future__ import annotations

import pytest
import torch

from dopd.common.kvcache import SlotCache
from dopd.common.models import load_target
from dopd.common.specdec import DecodeSettings, SpecEngine
from dopd.common.target_forward import HFForward, LeanForward


def _cache(t, B, S):
    cfg = t.model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return SlotCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, d, S, t.device, t.dtype)


def _run(fwd, t, layers):
    """A prefill of 3 rows, then a 4-token verification of rows 0 and 2 at different positions: both paths."""
    torch.manual_seed(0)
    V = t.info.vocab_size
    cache = _cache(t, 3, 64)
    ids = torch.randint(5, V, (3, 20))
    pos = torch.arange(20).expand(3, 20)
    a = fwd(ids, pos, cache, None, 20, layers)
    rows = torch.tensor([0, 2])
    vpos = torch.tensor([[12, 13, 14, 15], [19, 20, 21, 22]])
    b = fwd(torch.randint(5, V, (2, 4)), vpos, cache, rows, 23, layers)
    return a, b, cache


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen3", "tiny-random-mistral"])
def test_lean_equals_hf_fp32(name):
    t = load_target(name, "cpu", "float32", quiet=True)
    L = t.info.num_layers
    layers = [0, 2, L // 2, L]  # the embeddings, two inner layers and the final normed state
    ref = _run(HFForward(t.model), t, layers)
    got = _run(LeanForward(t.model), t, layers)  # built after the reference: its fused views must not change HF
    for r, g in zip(ref[:2], got[:2]):
        torch.testing.assert_close(g.logits, r.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.features, r.features, rtol=1e-5, atol=1e-5)
    for kr, kg in zip(ref[2].k + ref[2].v, got[2].k + got[2].v):
        torch.testing.assert_close(kg, kr, rtol=1e-5, atol=1e-5)
    # the HF modules still compute the same after fusing (their weights are now views into the fused ones)
    again = _run(HFForward(t.model), t, layers)
    torch.testing.assert_close(again[1].logits, ref[1].logits, rtol=0, atol=0)


def test_lean_bf16_is_close_to_hf_bf16():
    """bf16 with prepacked weights (oneDNN) rounds differently from HF's bf16; the logits stay within bf16's
    resolution of the same computation."""
    t = load_target("tiny-random-llama", "cpu", "bfloat16", quiet=True)
    ref = _run(HFForward(t.model), t, [2])
    got = _run(LeanForward(t.model), t, [2])
    for r, g in zip(ref[:2], got[:2]):
        scale = r.logits.float().abs().max()
        assert float((g.logits.float() - r.logits.float()).abs().max()) < 0.05 * scale


def test_engine_output_identical_with_either_forward_fp32(tiny_prompts):
    outs = {}
    for kind in ("hf", "lean"):
        t = load_target("tiny-random-llama", "cpu", "float32", quiet=True, forward=kind)
        res, _ = SpecEngine(t).generate(tiny_prompts, DecodeSettings(block_size=0, max_new_tokens=24, batch_size=3))
        outs[kind] = [r.output_ids for r in res]
    assert outs["hf"] == outs["lean"]
