"""Greedy-match acceptance at T > 0 (the target samples, a greedy draft is accepted iff it equals the sample) is
lossless too, and its acceptance is p(d) where rejection sampling's is sum min(p, q)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import OracleDrafter
from test_specdec import _chi_square_p, _exact_first_two

from dopd.common import sampling
from dopd.common.specdec import DecodeSettings, SpecEngine


@pytest.mark.heavy
def test_match_acceptance_is_lossless(tiny, tiny_prompts):
    T = 1.0
    prompt = tiny_prompts[2]
    joint = _exact_first_two(tiny, prompt, T).reshape(-1)
    n = 1500
    res, st = SpecEngine(tiny, OracleDrafter(tiny, noise=0.2, seed=2)).generate(
        [prompt] * n,
        DecodeSettings(block_size=3, temperature=T, max_new_tokens=2, batch_size=n, seed=4, acceptance="match"),
    )
    V = tiny.info.vocab_size
    counts = np.zeros(V * V)
    for r in res:
        if len(r.output_ids) >= 2:
            counts[r.output_ids[0] * V + r.output_ids[1]] += 1
    assert st.accepted_hist[0] > 0 and sum(st.accepted_hist[1:]) > 0
    assert _chi_square_p(counts, joint) > 1e-3


def test_match_rule_accepts_with_the_targets_probability_of_the_draft():
    """One position, many rows: P(accept) = p(d) under match, sum min(p, q) under rejection sampling."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    B = 40000
    P = p.expand(B, 2, 3).contiguous()
    d_greedy = torch.full((B, 1), 1)  # argmax q
    m = sampling.verify(d_greedy, P, None, False, g, rule="match").num_accepted.float().mean()
    d = torch.multinomial(q.expand(B, 3), 1, generator=g)
    r = sampling.verify(d, P, q.expand(B, 1, 3).contiguous(), False, g).num_accepted.float().mean()
    assert abs(float(m) - 0.3) < 0.01 and abs(float(r) - float(torch.minimum(p, q).sum())) < 0.01
