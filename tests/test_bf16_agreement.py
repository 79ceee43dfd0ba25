"""What bf16 can promise. In fp32 speculative greedy output equals plain greedy output token for token (the lossless
tests). In bf16 a verification forward over K+1 positions rounds differently from a one-token step, so a near-tie
between the target's two best tokens can flip: speculative output may leave plain bf16 decoding's at some token.
This test states how far: on 8 held-out prompts x 48 tokens, speculative decoding (K = 4, an untrained EAGLE-3
drafter: every step verifies 5 positions, so every committed token comes from a 5-position forward) against plain
decoding in the same engine; the share of identical answers and the mean share of each answer before the first
difference stay above bounds set below what was measured (docs/bench/bf16_agreement.txt has the numbers with
`make run`'s trained drafter); fp32 on the same prompts stays exact."""

from __future__ import annotations

import pytest

from dopd.common.config import DrafterConfig
from dopd.common.drafters import build_drafter
from dopd.common.models import load_target
from dopd.common.specdec import DecodeSettings, SpecEngine
from dopd.prompts import encode_all, load_prompt_set, split_prompts

pytestmark = pytest.mark.slow

# measured on this machine (AMX bf16): 7 of 8 answers identical (0.875), mean agreeing prefix 0.888; a bound sits
# about two prompts below each, so one more near-tie flip passes and a broken verification path does not
IDENTICAL_MIN = 0.5
PREFIX_MIN = 0.75


def agreeing_prefix(a: list[int], b: list[int]) -> float:
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return k / max(len(b), 1)


def spec_vs_plain(dtype: str) -> tuple[float, float, float]:
    t = load_target("smollm2-135m", dtype=dtype, quiet=True)
    sp = split_prompts(load_prompt_set("champ-problems"), 8, 0, "champ-problems")
    ids, _ = encode_all(t.tokenizer, sp.eval, 512, drop_long=False)
    base = [
        r.output_ids
        for r in SpecEngine(t).generate(ids, DecodeSettings(block_size=0, max_new_tokens=48, batch_size=8))[0]
    ]
    d = build_drafter(DrafterConfig(kind="eagle3"), t.info, t.model.config, t.embed_tokens.weight, t.lm_head.weight)
    res, st = SpecEngine(t, d).generate(ids, DecodeSettings(block_size=4, max_new_tokens=48, batch_size=8))
    spec = [r.output_ids for r in res]
    same = sum(x == y for x, y in zip(spec, base)) / len(base)
    prefix = sum(agreeing_prefix(x, y) for x, y in zip(spec, base)) / len(base)
    return same, prefix, st.tau


def test_bf16_speculative_output_stays_close_to_plain_bf16_decoding():
    same, prefix, tau = spec_vs_plain("bfloat16")
    print(f"bf16: identical {same:.3f}, agreeing prefix {prefix:.3f}, tau {tau:.3f}")
    assert same >= IDENTICAL_MIN and prefix >= PREFIX_MIN


def test_fp32_speculative_output_is_identical_on_the_same_prompts():
    same, prefix, _ = spec_vs_plain("float32")
    assert same == 1.0 and prefix == 1.0
