"""Decoding a text can also write its teacher data: the rows equal a teacher-forced prefill's (fp32), also for the
prompts decoded in a batch slot another prompt used before (two slots, so most prompts are refilled into one)."""

from __future__ import annotations

import numpy as np
import torch

from dopd.common.greedy import greedy_texts, prefill, teacher_data


def test_decoded_teacher_rows_equal_the_prefill(tiny, tiny_prompts, monkeypatch, tmp_path):
    layers, k = [2, 4, 6], 8
    prompts = [(str(i), p) for i, p in enumerate(tiny_prompts)]
    for lookahead in (False, True):
        monkeypatch.setenv("DOPD_CACHE", str(tmp_path / str(lookahead)))  # nothing cached: every text is decoded here
        texts, recs = teacher_data(
            tiny, layers, prompts, 20, k, batch_size=2, with_lookahead=lookahead, feature_dtype=torch.float32
        )
        assert all(t.decoded is not None for t in texts)
        ref = prefill(
            tiny,
            layers,
            [(r.prompt_id, r.token_ids.tolist(), r.prompt_len) for r in recs],
            k,
            feature_dtype=torch.float32,
        )
        for r, q in zip(recs, ref):
            P = r.prompt_len
            assert np.array_equal(r.token_ids, q.token_ids)
            assert np.array_equal(r.topk_ids[P - 1 :, 0], r.token_ids[P:])  # greedy: each answer token is the top-1
            torch.testing.assert_close(r.features, q.features, rtol=1e-4, atol=1e-4)
            assert np.array_equal(r.topk_ids[P - 1 :, :3], q.topk_ids[P - 1 :, :3])  # the top of the distribution
            np.testing.assert_allclose(r.topk_probs[P - 1 :], q.topk_probs[P - 1 :], atol=1e-4)
            assert (r.tail[: P - 1] == 1).all() and (r.topk_probs[: P - 1] == 0).all()  # prompt rows: no distribution


def test_cached_texts_are_not_decoded_again(tiny, tiny_prompts, monkeypatch, tmp_path):
    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    first = greedy_texts(tiny, tiny_prompts, 12, capture=([2], 4))
    again = greedy_texts(tiny, tiny_prompts, 12, capture=([2], 4))
    assert all(t.decoded is not None for t in first) and all(t.decoded is None for t in again)
    assert [t.answer for t in first] == [t.answer for t in again]
