"""The drafter's training forward is the forward used at inference (EAGLE-3 unroll, DFlash block)."""

from __future__ import annotations

import pytest
import torch

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter
from dopd.common.specdec import DecodeSettings, SpecEngine


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("vocab", [None, 128])
def test_training_forward_equals_inference(tiny, tiny_prompts, kind, layers, vocab):
    counts = torch.randint(0, 100, (tiny.info.vocab_size,), generator=torch.Generator().manual_seed(0))
    d = build_drafter(
        DrafterConfig(kind=kind, num_layers=layers, draft_vocab_size=vocab),
        tiny.info,
        tiny.model.config,
        tiny.embed_tokens.weight,
        tiny.lm_head.weight,
        counts,
        seed=3,
    )
    K = 4
    res, _ = SpecEngine(tiny, d).generate(
        tiny_prompts[:3], DecodeSettings(block_size=K, max_new_tokens=24, batch_size=2, record=True, keep_features=True)
    )
    for r in res:
        seq = torch.tensor([r.prompt_ids + r.output_ids])
        feats = torch.zeros(1, seq.shape[1], r.features.shape[1])
        feats[0, : r.features.shape[0]] = r.features
        anchors = torch.tensor([[st.prefix_len for st in r.steps]])
        blocks = torch.tensor([[list(st.draft_tokens) for st in r.steps]])
        h = d.block_hidden(seq, feats, torch.tensor([seq.shape[1]]), anchors, blocks)
        logits = d.logits(h)
        lp = torch.log_softmax(logits.float(), -1)
        didx = d.t2d[blocks]
        train_lp = lp.gather(-1, didx[..., None]).squeeze(-1)
        infer_lp = torch.tensor([[list(st.draft_logprobs) for st in r.steps]])
        torch.testing.assert_close(train_lp, infer_lp, atol=2e-4, rtol=1e-4)
        assert torch.equal(d.draft_ids[logits.argmax(-1)], blocks)  # greedy drafts are the training argmax


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_draft_blocks_match_block_hidden(tiny, tiny_prompts, kind):
    """Replay drafting (draft_blocks) and the training forward agree on the drafted tokens."""
    d = build_drafter(
        DrafterConfig(kind=kind), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight, seed=5
    )
    res, _ = SpecEngine(tiny, d).generate(
        tiny_prompts[:1], DecodeSettings(block_size=3, max_new_tokens=16, record=True, keep_features=True)
    )
    r = res[0]
    seq = torch.tensor([r.prompt_ids + r.output_ids])
    feats = torch.zeros(1, seq.shape[1], r.features.shape[1])
    feats[0, : r.features.shape[0]] = r.features
    anchors = torch.tensor([[len(r.prompt_ids) + 2, len(r.prompt_ids) + 5, len(r.prompt_ids) + 9]])
    ids, lp, q = d.draft_blocks(seq, feats, torch.tensor([seq.shape[1]]), anchors, 3)
    h = d.block_hidden(seq, feats, torch.tensor([seq.shape[1]]), anchors, ids)
    assert torch.equal(d.draft_ids[d.logits(h).argmax(-1)], ids)
    assert torch.all(q == 1.0)
