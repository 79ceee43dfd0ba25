"""The speculative engine is lossless: greedy output == plain target greedy; sampled output ~ the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HashOracleDrafter, OracleDrafter, hash_oracle_accepted, tau_alpha_of

from dopd.common import sampling
from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter
from dopd.common.errors import PromptError
from dopd.common.specdec import DecodeSettings, SpecEngine


def plain(target, prompts, n, batch=3):
    res, _ = SpecEngine(target).generate(prompts, DecodeSettings(block_size=0, max_new_tokens=n, batch_size=batch))
    return [r.output_ids for r in res]


def test_plain_decoding_equals_hf_generate(tiny, tiny_prompts):
    ours = plain(tiny, tiny_prompts, 24)
    for p, o in zip(tiny_prompts, ours):
        ref = tiny.model.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tiny.eos_token_ids, pad_token_id=0
        )
        assert ref[0, len(p) :].tolist() == o


@pytest.mark.parametrize("K", [1, 4, 8])
def test_greedy_spec_equals_target_tiny_oracle(tiny, tiny_prompts, K):
    """High-acceptance drafts (target + noise): partial accepts, full accepts with bonus, rejections."""
    base = plain(tiny, tiny_prompts, 40)
    res, st = SpecEngine(tiny, OracleDrafter(tiny, noise=0.25)).generate(
        tiny_prompts, DecodeSettings(block_size=K, max_new_tokens=40, batch_size=3)
    )
    assert [r.output_ids for r in res] == base
    assert st.accepted_hist[K] > 0 and st.accepted_hist[0] > 0  # both extremes happened
    assert st.tau > 1.5


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
@pytest.mark.parametrize("K", [1, 4, 8])
def test_greedy_spec_equals_target_real_drafters(tiny, tiny_prompts, kind, K, trained_tiny_drafter):
    base = plain(tiny, tiny_prompts, 40)
    d = (
        trained_tiny_drafter
        if kind == "eagle3"
        else build_drafter(
            DrafterConfig(kind=kind), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight
        )
    )
    res, st = SpecEngine(tiny, d).generate(tiny_prompts, DecodeSettings(block_size=K, max_new_tokens=40, batch_size=2))
    assert [r.output_ids for r in res] == base
    if kind == "eagle3":
        assert st.tau > 1.2  # the trained drafter really gets tokens accepted


@pytest.mark.heavy
def test_dflash_engine_with_real_acceptance(tiny, tiny_prompts, trained_tiny_dflash):
    """A DFlash drafter that gets accepted: several drafts per step, rows advancing unevenly, slots refilled. The
    engine stays lossless, and its incremental drafting (a K/V cache of the target's features) proposes exactly
    what the block forward proposes from scratch at the same positions: the simulated tau equals the engine's."""
    from dopd.common.evaluation import simulated_tau

    prompts = tiny_prompts
    base = plain(tiny, prompts, 40)
    s = DecodeSettings(block_size=4, max_new_tokens=40, batch_size=3)
    res, st = SpecEngine(tiny, trained_tiny_dflash).generate(prompts, s)
    assert [r.output_ids for r in res] == base
    assert st.tau > 1.15 and sum(st.accepted_hist[2:]) > 0, (st.tau, st.accepted_hist)  # measured: 1.32
    sim = simulated_tau(tiny, trained_tiny_dflash, prompts, s)
    assert (sim.num_steps, sim.accepted_hist) == (st.num_steps, st.accepted_hist)


def test_continuous_batching_refills_slots(tiny, tiny_prompts):
    """More prompts than slots, rows finishing at different lengths: still identical to plain decoding."""
    prompts = tiny_prompts * 3
    base = plain(tiny, prompts, 30, batch=4)
    res, _ = SpecEngine(tiny, OracleDrafter(tiny, noise=0.4)).generate(
        prompts, DecodeSettings(block_size=4, max_new_tokens=30, batch_size=2)
    )
    assert [r.output_ids for r in res] == base


def test_records_are_consistent(tiny, tiny_prompts):
    res, _ = SpecEngine(tiny, OracleDrafter(tiny, noise=0.3)).generate(
        tiny_prompts[:2], DecodeSettings(block_size=4, max_new_tokens=20, record=True, keep_features=True)
    )
    for r in res:
        assert r.features.shape[0] == len(r.prompt_ids) + len(r.output_ids) - 1
        n = len(r.prompt_ids)
        committed = []
        for st in r.steps:
            assert st.prefix_len == n + len(committed)
            a = int(st.accept_mask.sum())
            assert st.accept_mask[:a].all() and not st.accept_mask[a:].any()
            c = min(a, len(st.committed))  # the last step may be cut at max_new_tokens / EOS
            assert list(st.draft_tokens[:c]) == st.committed[:c]
            np.testing.assert_allclose(st.target_topk_probs.sum(-1) + st.target_tail, 1.0, atol=1e-4)
            # greedy: an accepted token is the target's top-1
            assert all(st.target_topk_ids[i, 0] == st.draft_tokens[i] for i in range(a))
            committed += st.committed
        assert committed == r.output_ids


@pytest.mark.slow
@pytest.mark.parametrize("K", [1, 4, 8])
def test_greedy_spec_equals_target_smollm2(smollm2, K):
    from dopd.prompts import encode_all, load_prompt_set, split_prompts

    sp = split_prompts(load_prompt_set("champ-problems"), 4, 0, "champ-problems")
    ids, _ = encode_all(smollm2.tokenizer, sp.eval, 512, False)
    ids = [ids[0], ids[1][:40], ids[2], ids[3][:60]]  # different lengths
    base = plain(smollm2, ids, 24, batch=4)
    res, st = SpecEngine(smollm2, OracleDrafter(smollm2, noise=0.3)).generate(
        ids, DecodeSettings(block_size=K, max_new_tokens=24, batch_size=3)
    )
    assert [r.output_ids for r in res] == base
    assert st.tau > 1.3
    d = build_drafter(
        DrafterConfig(kind="eagle3"),
        smollm2.info,
        smollm2.model.config,
        smollm2.embed_tokens.weight,
        smollm2.lm_head.weight,
    )
    res, _ = SpecEngine(smollm2, d).generate(ids, DecodeSettings(block_size=K, max_new_tokens=24, batch_size=4))
    assert [r.output_ids for r in res] == base


# --- sampling: the first generated tokens are distributed as the target's --------------------------------------


def _exact_first_two(target, prompt, T):
    """Exact joint distribution of the first two tokens under the target at temperature T."""
    with torch.no_grad():
        p1 = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1].float() / T, -1)
        V = p1.shape[0]
        seqs = torch.tensor([prompt + [v] for v in range(V)])
        p2 = torch.softmax(target.model(seqs).logits[:, -1].float() / T, -1)
    return (p1[:, None] * p2).numpy()  # [V, V]


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chi2

    n = counts.sum()
    exp = probs * n
    order = np.argsort(-exp)
    exp, counts = exp[order], counts[order]
    big = exp >= 5
    e = np.append(exp[big], exp[~big].sum())
    c = np.append(counts[big], counts[~big].sum())
    if e[-1] < 5:  # merge a small tail bucket into the last big one
        e[-2] += e[-1]
        c[-2] += c[-1]
        e, c = e[:-1], c[:-1]
    stat = ((c - e) ** 2 / e).sum()
    return float(chi2.sf(stat, len(e) - 1))


def _sample_pairs(tiny, prompt, n, T, seed):
    drafter = OracleDrafter(tiny, q_temperature=2.0, seed=seed)
    res, st = SpecEngine(tiny, drafter).generate(
        [prompt] * n, DecodeSettings(block_size=3, temperature=T, max_new_tokens=2, batch_size=n, seed=seed)
    )
    V = tiny.info.vocab_size
    counts = np.zeros(V * V)
    for r in res:
        if len(r.output_ids) >= 2:
            counts[r.output_ids[0] * V + r.output_ids[1]] += 1
    return counts, st


def test_sampling_matches_target_distribution(tiny, tiny_prompts):
    T = 1.0
    prompt = tiny_prompts[2]
    joint = _exact_first_two(tiny, prompt, T).reshape(-1)
    counts, st = _sample_pairs(tiny, prompt, 1500, T, seed=1)
    assert st.accepted_hist[0] > 0 and sum(st.accepted_hist[1:]) > 0  # both accept and reject happened
    assert _chi_square_p(counts, joint) > 1e-3
    tv = 0.5 * np.abs(counts / counts.sum() - joint).sum()
    assert tv < 0.15


def test_broken_acceptance_rule_is_detected(tiny, tiny_prompts, monkeypatch):
    """Resampling from p instead of norm(max(0, p - q)) after a rejection biases the output: the test catches it."""
    real = sampling.verify

    def broken(draft, p, q, greedy, generator=None, rule="rejection"):
        v = real(draft, p, q, greedy, generator, rule)
        rows = torch.arange(draft.shape[0])
        v.next_token = sampling.sample(p[rows, v.num_accepted], generator)  # wrong: ignores the residual
        return v

    monkeypatch.setattr("dopd.common.specdec.verify", broken)
    T = 1.0
    prompt = tiny_prompts[2]
    joint = _exact_first_two(tiny, prompt, T).reshape(-1)
    counts, _ = _sample_pairs(tiny, prompt, 1500, T, seed=1)
    assert _chi_square_p(counts, joint) < 1e-3


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_inputs_have_clear_errors(tiny, tiny_prompts):
    d = build_drafter(
        DrafterConfig(kind="eagle3"), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight
    )
    eng = SpecEngine(tiny, d)
    with pytest.raises(PromptError, match="block size K must be >= 1"):
        eng.generate(tiny_prompts, DecodeSettings(block_size=0))
    with pytest.raises(PromptError, match="empty"):
        eng.generate([], DecodeSettings())
    with pytest.raises(PromptError, match="too long"):
        eng.generate([[5] * 2040], DecodeSettings(max_new_tokens=32))
    with pytest.raises(PromptError, match="at least 2"):
        eng.generate([[5]], DecodeSettings())


@pytest.mark.parametrize("arch", ["tiny-random-qwen2", "tiny-random-qwen3", "tiny-random-mistral"])
def test_greedy_spec_equals_target_other_architectures(arch):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Mistral targets: plain decoding equals HF generate and greedy
    speculative decoding equals plain decoding with both drafter kinds (feature capture at their layers)."""
    from dopd.common.models import load_target

    tgt = load_target(arch)
    prompts = [
        tgt.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for t in ["hi", "2+2=?", "tell me a story"]
    ]
    base = plain(tgt, prompts, 24)
    for p, o in zip(prompts, base):
        ref = tgt.model.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tgt.eos_token_ids, pad_token_id=0
        )
        assert ref[0, len(p) :].tolist() == o
    res, st = SpecEngine(tgt, OracleDrafter(tgt, noise=0.25)).generate(
        prompts, DecodeSettings(block_size=4, max_new_tokens=24, batch_size=2)
    )
    assert [r.output_ids for r in res] == base and st.tau > 1.5
    for kind in ("eagle3", "dflash"):
        d = build_drafter(
            DrafterConfig(kind=kind), tgt.info, tgt.model.config, tgt.embed_tokens.weight, tgt.lm_head.weight
        )
        res, _ = SpecEngine(tgt, d).generate(prompts, DecodeSettings(block_size=4, max_new_tokens=24, batch_size=2))
        assert [r.output_ids for r in res] == base


def test_unsupported_architecture_is_refused_at_load(tmp_path):
    from transformers import GPT2Config

    from dopd.common.errors import ModelError
    from dopd.common.models import load_target

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'gpt2'.*llama, qwen2, qwen3, mistral"):
        load_target(str(tmp_path))


@pytest.mark.parametrize("period,K", [(3, 4), (5, 3), (2, 2)])
def test_engine_tau_equals_an_independent_count(tiny, tiny_prompts, period, K):
    """The engine's accepted drafts per step, tau and alpha against counts made without it: a drafter that is wrong
    exactly at positions p % period == 0 accepts a known number of drafts at every step (helpers.hash_oracle_accepted)."""
    res, st = SpecEngine(tiny, HashOracleDrafter(tiny, period=period)).generate(
        tiny_prompts, DecodeSettings(block_size=K, max_new_tokens=20, batch_size=2)
    )
    expected = [hash_oracle_accepted(len(r.prompt_ids), len(r.output_ids), K, period) for r in res]
    assert [r.accepted for r in res] == expected
    tau, alpha = tau_alpha_of([a for e in expected for a in e], K)
    assert st.num_steps == sum(map(len, expected))
    assert st.tau == pytest.approx(tau, abs=1e-12) and st.alpha == pytest.approx(alpha, abs=1e-12)
    assert 1 < tau < K + 1  # partial acceptance: neither all nor none
