"""The DVI drafter: self-speculative (the target's own first k layers, shared, frozen) + a trainable low-rank head."""

from __future__ import annotations

import pytest
import torch

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter, drafter_for_target, load_drafter
from dopd.common.drafters.dvi import on_text_positions
from dopd.common.errors import ModelError
from dopd.common.specdec import DecodeSettings, SpecEngine


def dvi(tiny, seed=0, **kw):
    d = build_drafter(
        DrafterConfig(kind="dvi", **kw),
        tiny.info,
        tiny.model.config,
        tiny.embed_tokens.weight,
        tiny.lm_head.weight,
        seed=seed,
    )
    d.bind_target(tiny.model)
    return d


def perturbed(tiny, seed=1, scale=0.5):
    """A DVI drafter whose low-rank term is non-zero (a fresh one is the plain early exit)."""
    d = dvi(tiny, seed=seed)
    with torch.no_grad():
        d.lora_A.normal_(0, scale, generator=torch.Generator().manual_seed(seed))
    return d


def plain(target, prompts, n):
    res, _ = SpecEngine(target).generate(prompts, DecodeSettings(block_size=0, max_new_tokens=n, batch_size=3))
    return [r.output_ids for r in res]


@pytest.mark.parametrize("K", [1, 4, 8])
@pytest.mark.parametrize("exit_layer", [2, 8])
def test_dvi_greedy_output_equals_plain_target(tiny, tiny_prompts, K, exit_layer):
    base = plain(tiny, tiny_prompts, 40)
    d = dvi(tiny, feature_layers=[exit_layer])
    res, st = SpecEngine(tiny, d).generate(tiny_prompts, DecodeSettings(block_size=K, max_new_tokens=40, batch_size=2))
    assert [r.output_ids for r in res] == base
    if (
        exit_layer == 8
    ):  # all 8 layers + the target's head (A = 0, norm = ones = the tiny target's final norm): the target itself
        assert st.accepted_hist[K] == st.num_steps  # so the shared-layer drafting reproduces the target exactly


def test_dvi_shares_the_targets_layers_and_trains_only_its_head(tiny):
    d = dvi(tiny, feature_layers=[3], lora_rank=4)
    shared = d.shared_layers()
    assert len(shared) == 3
    for mine, theirs in zip(shared, tiny.model.model.layers[:3]):
        assert mine is theirs
        assert mine.self_attn.q_proj.weight.data_ptr() == theirs.self_attn.q_proj.weight.data_ptr()
        assert mine.mlp.down_proj.weight.data_ptr() == theirs.mlp.down_proj.weight.data_ptr()
    V, H = tiny.info.vocab_size, tiny.info.hidden_size
    names = {n for n, _ in d.named_parameters()}
    assert names == {"norm.weight", "lora_A", "lora_B"}
    assert d.num_parameters(trainable_only=False) == 4 * (V + H) + H  # no target layer is a parameter
    assert set(d.state_dict()) == {"norm.weight", "lora_A", "lora_B", "draft_ids"}  # nor saved / published
    assert d.head_weight.data_ptr() == tiny.lm_head.weight.data_ptr()
    assert not any(p.requires_grad for layer in shared for p in layer.parameters())  # frozen
    # a backward through the drafter's training forward leaves the target untouched
    feats = torch.randn(1, 10, H)
    h = d.block_hidden(
        torch.zeros(1, 10, dtype=torch.long),
        feats,
        torch.tensor([10]),
        torch.tensor([[3, 5]]),
        torch.zeros(1, 2, 4, dtype=torch.long),
    )
    d.logits(h).logsumexp(-1).sum().backward()
    assert d.lora_A.grad is not None and all(p.grad is None for p in tiny.model.parameters())


def test_dvi_training_forward_equals_inference_on_the_text(tiny, tiny_prompts):
    """Teacher-forced early exit (features) = the engine's drafting through the shared layers, at every block
    position whose inputs are the committed text (accepted drafts + the first rejection)."""
    d = perturbed(tiny, scale=0.3)
    K = 4
    res, st = SpecEngine(tiny, d).generate(
        tiny_prompts[:3], DecodeSettings(block_size=K, max_new_tokens=24, batch_size=2, record=True, keep_features=True)
    )
    checked = 0
    for r in res:
        seq = torch.tensor([r.prompt_ids + r.output_ids])
        feats = torch.zeros(1, seq.shape[1], r.features.shape[1])
        feats[0, : r.features.shape[0]] = r.features
        anchors = torch.tensor([[s.prefix_len for s in r.steps]])
        blocks = torch.tensor([[list(s.draft_tokens) for s in r.steps]])
        lengths = torch.tensor([seq.shape[1]])
        lp = torch.log_softmax(d.logits(d.block_hidden(seq, feats, lengths, anchors, blocks)).float(), -1)
        train_lp = lp.gather(-1, blocks[..., None]).squeeze(-1)
        infer_lp = torch.tensor([[list(s.draft_logprobs) for s in r.steps]])
        ok = on_text_positions(seq, lengths, anchors, blocks)
        acc = torch.tensor([[list(s.accept_mask) for s in r.steps]])
        first_rej = torch.arange(K)[None, None] == acc.long().cumprod(-1).sum(-1, keepdim=True)
        sampled = (acc | first_rej) & (anchors[..., None] + torch.arange(K) - 1 <= seq.shape[1] - 2)
        assert torch.equal(ok & sampled, sampled)  # every DVI sample is on the text
        torch.testing.assert_close(train_lp[ok], infer_lp[ok], atol=2e-4, rtol=1e-4)
        checked += int(ok.sum())
    assert checked > 20 and 0 < st.accepted_hist[0] < st.num_steps  # accepted and rejected both happened


def test_dvi_draft_blocks_are_the_greedy_early_exit(tiny, tiny_prompts):
    d = perturbed(tiny)
    res, _ = SpecEngine(tiny, d).generate(
        tiny_prompts[:1], DecodeSettings(block_size=3, max_new_tokens=16, record=True, keep_features=True)
    )
    r = res[0]
    seq = torch.tensor([r.prompt_ids + r.output_ids])
    feats = torch.zeros(1, seq.shape[1], r.features.shape[1])
    feats[0, : r.features.shape[0]] = r.features
    anchors = torch.tensor([[s.prefix_len for s in r.steps]])
    ids, lp, q = d.draft_blocks(seq, feats, torch.tensor([seq.shape[1]]), anchors, 3)
    engine = torch.tensor([[list(s.draft_tokens) for s in r.steps]])
    ok = on_text_positions(seq, torch.tensor([seq.shape[1]]), anchors, engine)
    assert torch.equal(ids[ok], engine[ok]) and bool(ok[..., 0].all())
    assert torch.all(q == 1.0)


def test_dvi_save_load_and_eval_name(tiny, tmp_path):
    d = perturbed(tiny)
    d.save_pretrained(tmp_path / "d")
    e = load_drafter(tmp_path / "d", tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    assert e.kind == "dvi" and e.exit_layer == d.exit_layer and torch.equal(e.lora_A, d.lora_A)
    f = drafter_for_target("init-dvi", tiny)
    assert f.kind == "dvi" and f.shared_layers()[0] is tiny.model.model.layers[0]
    with pytest.raises(ModelError, match="draft_vocab_size"):
        dvi(tiny, draft_vocab_size=64)
    with pytest.raises(ModelError, match="feature_layers"):
        dvi(tiny, feature_layers=[2, 4])
    with pytest.raises(ModelError, match="not bound"):
        build_drafter(
            DrafterConfig(kind="dvi"), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight
        ).shared_layers()
