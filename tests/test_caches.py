"""The on-disk caches of the target's work (greedy texts, teacher-forced prefill records) are inputs like any other:
a damaged entry is recomputed, never trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter
from dopd.common.greedy import teacher_data


@pytest.mark.heavy
def test_damaged_cache_entries_are_recomputed_not_used(tiny, tiny_prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    layers = build_drafter(
        DrafterConfig(), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight
    ).feature_layers
    items = [(f"p{i}", p) for i, p in enumerate(tiny_prompts[:3])]
    texts, recs = teacher_data(tiny, layers, items, 8, 4)
    prefill = sorted((tmp_path / "prefill").iterdir())
    greedy = sorted((tmp_path / "greedy").iterdir())
    assert len(greedy) == 3 and len(prefill) == 6  # a decoded text writes both variants (with and without lookahead)
    for j, f in enumerate(prefill):
        if j % 2:
            f.write_bytes(f.read_bytes()[:100])  # torn
        else:
            b = bytearray(f.read_bytes())
            b[-7] ^= 0x40  # one bit of a stored array: the CRC refuses it
            f.write_bytes(bytes(b))
    greedy[0].write_text(json.dumps({"continuation": [tiny.info.vocab_size + 5] * 4}))  # ids outside the vocabulary
    greedy[1].write_text(json.dumps({"continuation": "not a list"}))
    texts2, recs2 = teacher_data(tiny, layers, items, 8, 4)
    assert [t.tokens for t in texts2] == [t.tokens for t in texts]
    for a, r in zip(recs, recs2):  # recomputed in another batch: equal up to the batch's float rounding
        # the rows that predict answer tokens (a record written while decoding carries no distribution on prompt rows,
        # one recomputed by a prefill does)
        P = a.prompt_len - 1
        assert np.array_equal(a.token_ids, r.token_ids) and np.array_equal(a.topk_ids[P:], r.topk_ids[P:])
        np.testing.assert_allclose(r.topk_probs[P:], a.topk_probs[P:], atol=1e-5)
        np.testing.assert_allclose(r.tail[P:], a.tail[P:], atol=1e-5)
        torch.testing.assert_close(r.features.float(), a.features.float(), rtol=2e-2, atol=2e-2)
