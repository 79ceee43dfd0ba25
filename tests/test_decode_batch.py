"""The step-wise engine the server drives: rows join and leave between steps, drafter weights swap between steps,
and the output stays exactly plain target decoding (fp32, greedy)."""

from __future__ import annotations

import pytest
from helpers import OracleDrafter

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter
from dopd.common.errors import PromptError
from dopd.common.specdec import DecodeSettings, SpecEngine


def plain(target, prompts, n):
    res, _ = SpecEngine(target).generate(prompts, DecodeSettings(block_size=0, max_new_tokens=n, batch_size=3))
    return [r.output_ids for r in res]


def eagle(tiny, seed):
    return build_drafter(
        DrafterConfig(kind="eagle3"), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight,
        seed=seed,
    )  # fmt: skip


def test_rows_join_mid_flight_with_their_own_budgets(tiny, tiny_prompts):
    """Prompts joining while others run, each with its own max_new_tokens, equal plain decoding of that length."""
    budgets = [30, 7, 19, 25, 3]
    refs = [plain(tiny, [p], n)[0] for p, n in zip(tiny_prompts, budgets)]
    eng = SpecEngine(tiny, OracleDrafter(tiny, noise=0.3))
    b = eng.batch(DecodeSettings(block_size=4, max_new_tokens=1), capacity=3, max_len=200)
    out, joined, step = {}, 0, 0
    while joined < len(tiny_prompts) or b.num_rows:
        if joined < len(tiny_prompts) and b.free and step % 2 == 0:  # join every other step, not all at once
            b.join(tiny_prompts[joined], key=joined, max_new_tokens=budgets[joined])
            joined += 1
        for ev in b.step():
            if ev.result is not None:
                out[ev.key] = ev.result.output_ids
        step += 1
    assert [out[i] for i in range(len(tiny_prompts))] == refs
    assert b.stats.tau > 1.5  # the oracle's drafts were accepted: the speculative path ran


def test_cancel_frees_the_row(tiny, tiny_prompts):
    eng = SpecEngine(tiny, OracleDrafter(tiny, noise=0.3))
    b = eng.batch(DecodeSettings(block_size=2, max_new_tokens=40), capacity=1, max_len=200)
    b.join(tiny_prompts[0], key="a")
    b.step()
    with pytest.raises(PromptError, match="full"):
        b.join(tiny_prompts[1], key="b")
    res = b.cancel("a")
    assert res is not None and res.finish == "cancelled" and len(res.output_ids) >= 1
    assert b.free == 1 and b.cancel("a") is None
    b.join(tiny_prompts[1], key="b", max_new_tokens=10)
    while b.num_rows:
        evs = b.step()
    assert evs[0].result.output_ids == plain(tiny, [tiny_prompts[1]], 10)[0]


def test_weight_swaps_between_steps_stay_lossless(tiny, tiny_prompts):
    """New random drafter weights between steps (the drafter context is rebuilt): output unchanged."""
    refs = plain(tiny, tiny_prompts, 30)
    eng = SpecEngine(tiny, eagle(tiny, 0))
    b = eng.batch(DecodeSettings(block_size=3, max_new_tokens=30), capacity=5, max_len=200)
    for i, p in enumerate(tiny_prompts):
        b.join(p, key=i)
    out, step = {}, 0
    while b.num_rows:
        if step % 3 == 1:
            eng.set_drafter_weights(eagle(tiny, 100 + step).state_dict())
        for ev in b.step():
            if ev.result is not None:
                out[ev.key] = ev.result.output_ids
        step += 1
    assert eng.weights_version >= 3
    assert [out[i] for i in range(len(tiny_prompts))] == refs


def test_weight_swap_really_changes_the_drafter(tiny, tiny_prompts):
    """The swap is not a no-op: the drafter's parameters equal the new ones (and differ from the old)."""
    eng = SpecEngine(tiny, eagle(tiny, 0))
    new = eagle(tiny, 7).state_dict()
    name = next(k for k in new if k.startswith("fc"))
    assert not eng.drafter.state_dict()[name].equal(new[name])
    eng.set_drafter_weights(new)
    assert eng.drafter.state_dict()[name].equal(new[name])
    with pytest.raises(PromptError, match="no drafter"):
        SpecEngine(tiny).set_drafter_weights(new)


def test_join_refuses_a_prompt_over_the_batch_length(tiny, tiny_prompts):
    b = SpecEngine(tiny).batch(DecodeSettings(block_size=0, max_new_tokens=8), capacity=2, max_len=40)
    with pytest.raises(PromptError, match="does not fit"):
        b.join(tiny_prompts[3], max_new_tokens=30)
