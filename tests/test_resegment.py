"""Greedy rollout by re-segmentation equals the engine, step for step; simulated tau equals the engine's tau."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HashOracleDrafter

from dopd.actors.experience import shuffled_plan
from dopd.actors.resegmented import resegmented_rollout
from dopd.actors.rollout import engine_rollout
from dopd.common.drafters import drafter_for_target
from dopd.common.errors import PromptError
from dopd.common.evaluation import quick_tau, simulated_tau
from dopd.common.load import load_config
from dopd.common.specdec import DecodeSettings

TEXTS = ["hi", "write a function that sums a list", "2+2=?", "tell me a long story about a dragon and a knight"]


def prompts_for(target, n=3):
    return [
        (
            f"p{i}",
            target.tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
            ),
        )
        for i, t in enumerate(TEXTS[:n])
    ]


def same_distribution(ids_a, p_a, ids_b, p_b, atol=1e-5):
    """Top-k rows equal up to numerical noise: probabilities within atol, ids equal wherever the order is not a
    near-tie (a tiny random model's distributions are almost flat)."""
    np.testing.assert_allclose(p_a, p_b, atol=atol)
    gap_ok = np.abs(np.diff(p_a, axis=-1)) > 10 * atol
    # an id is pinned down when it is clearly apart from both neighbours; the k-th may tie with the unseen (k+1)-th
    clear = np.concatenate([gap_ok[..., :1], gap_ok[..., 1:] & gap_ok[..., :-1], np.zeros_like(gap_ok[..., :1])], -1)
    np.testing.assert_array_equal(np.where(clear, ids_a, -1), np.where(clear, ids_b, -1))


def compare(target, drafter, K, max_new=24, n_prompts=3):
    cfg = load_config(None, [f"rollout.block_size={K}", f"rollout.max_new_tokens={max_new}", "rollout.batch_size=3"])
    prompts = prompts_for(target, n_prompts)
    eng, st = engine_rollout(target, drafter, prompts, cfg.rollout, seed=0)
    res, rs = resegmented_rollout(target, drafter, prompts, cfg, score=True)
    assert rs.accepted == [int(a) for s in eng for a in s.accepted]
    steps = 0
    for e, r in zip(eng, res):
        assert e.tokens == r.tokens and e.prompt_len == r.prompt_len
        be, br = e.blocks, r.blocks
        np.testing.assert_array_equal(be.anchor, br.anchor)
        np.testing.assert_array_equal(be.draft_tokens, br.draft_tokens)
        np.testing.assert_array_equal(be.accept_mask, br.accept_mask)
        np.testing.assert_allclose(be.draft_logprobs, br.draft_logprobs, atol=1e-4)
        same_distribution(be.target_topk_ids, be.target_topk_probs, br.target_topk_ids, br.target_topk_probs)
        np.testing.assert_allclose(be.target_tail, br.target_tail, atol=1e-5)
        np.testing.assert_allclose(be.target_draft_prob, br.target_draft_prob, atol=1e-5)
        assert (br.streams == 3).all()
        n = len(e.tokens)
        # fp32 features from two batch shapes (the engine's steps vs one prefill) differ by summation order: noise
        # scales with the residual stream's magnitude (seen: 1.1e-4 on one of 70,848 values on an AMD EPYC, where the
        # stream reaches ~1e2), so the tolerance is relative to the largest feature; a wrong row is off by O(1)
        fe, fr = e.features[: n - 1].float(), r.features[: n - 1].float()
        torch.testing.assert_close(fe, fr, atol=1e-5 * float(fe.abs().max()), rtol=1e-4)
        steps += len(be)
    return st, steps


@pytest.mark.heavy
@pytest.mark.parametrize("K", [1, 4, 8])
@pytest.mark.parametrize("kind", ["eagle3", "dflash", "oracle"])
def test_resegmented_records_equal_the_engine_tiny(tiny, trained_tiny_drafter, kind, K):
    drafter = {
        "eagle3": lambda: trained_tiny_drafter,
        "dflash": lambda: drafter_for_target("init-dflash", tiny, seed=3),
        "oracle": lambda: HashOracleDrafter(tiny),
    }[kind]()
    st, steps = compare(tiny, drafter, K, n_prompts=4)
    assert steps > 10
    if kind != "dflash":  # a fresh DFlash drafter is (almost) never accepted; the others must be, sometimes
        assert 0 < sum(st.accepted_hist[1:]) < st.num_steps or K == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind,K", [("eagle3", 4), ("dflash", 8), ("oracle", 1), ("oracle", 4), ("oracle", 8)])
def test_resegmented_records_equal_the_engine_smollm2(smollm2, kind, K):
    drafter = HashOracleDrafter(smollm2) if kind == "oracle" else drafter_for_target(f"init-{kind}", smollm2, seed=1)
    st, _ = compare(smollm2, drafter, K, max_new=20)
    if kind == "oracle":
        assert st.tau > 1.3  # partial acceptance: every verification path (accept, reject, bonus) is exercised


@pytest.mark.heavy
def test_simulated_tau_equals_engine_tau(tiny, trained_tiny_drafter):
    prompts = [p for _, p in prompts_for(tiny, 4)]
    for K in (2, 5):
        s = DecodeSettings(block_size=K, max_new_tokens=40, batch_size=4)
        eng = quick_tau(tiny, trained_tiny_drafter, prompts, s)
        cache: dict = {}
        sim = simulated_tau(tiny, trained_tiny_drafter, prompts, s, cache=cache)
        assert (sim.num_steps, sim.accepted_hist, sim.new_tokens) == (eng.num_steps, eng.accepted_hist, eng.new_tokens)
        assert sim.tau == eng.tau and sim.alpha == eng.alpha and eng.tau > 1.2
        assert len(cache) == len(prompts)  # the next call costs drafter forwards only
        assert simulated_tau(tiny, trained_tiny_drafter, prompts, s, cache=cache).tau == eng.tau


@pytest.mark.slow
def test_simulated_tau_equals_engine_tau_smollm2(smollm2):
    d = HashOracleDrafter(smollm2, period=4)
    prompts = [p for _, p in prompts_for(smollm2, 3)]
    s = DecodeSettings(block_size=4, max_new_tokens=24, batch_size=3)
    eng, sim = quick_tau(smollm2, d, prompts, s), simulated_tau(smollm2, d, prompts, s)
    assert sim.accepted_hist == eng.accepted_hist and sim.tau == eng.tau and eng.tau > 1.5


@pytest.mark.heavy
def test_simulate_refuses_sampling_and_long_prompts(tiny, trained_tiny_drafter):
    prompts = [p for _, p in prompts_for(tiny, 2)]
    with pytest.raises(PromptError, match="greedy decoding only"):
        simulated_tau(tiny, trained_tiny_drafter, prompts, DecodeSettings(block_size=4, temperature=0.7))
    with pytest.raises(PromptError, match="too long"):
        simulated_tau(tiny, trained_tiny_drafter, [list(range(5000))], DecodeSettings(block_size=4, max_new_tokens=8))


def test_shuffled_plan_keeps_the_multiset_of_segment_lengths():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lens = rng.integers(1, 9, size=rng.integers(1, 30))
        R = int(lens.sum() + rng.integers(0, 20))
        anchors, got = shuffled_plan(lens, 17, R, rng)
        assert sorted(got.tolist()) == sorted(lens.tolist())
        ends = anchors + got
        assert anchors[0] >= 17 and ends[-1] <= 17 + R  # inside the response
        assert (anchors[1:] >= ends[:-1]).all()  # in order, never overlapping: the token count is preserved
    with pytest.raises(ValueError):
        shuffled_plan(np.array([5, 5]), 0, 9, rng)
