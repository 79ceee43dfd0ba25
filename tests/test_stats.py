"""The experiment statistics (experiments/stats.py): SE over seeds, paired bootstrap contrasts that cover a known difference."""

import numpy as np
import pytest

from dopd.experiments.stats import PerPrompt, arm_mean_se, contrast, seed_se


def _arm(rng: np.random.Generator, difficulty: np.ndarray, lift: float, K: int = 8, steps: int = 40) -> PerPrompt:
    """Synthetic evaluation: per prompt `steps` verification steps, accepted drafts ~ Binomial(K, p) with the
    prompt's own acceptance probability p = difficulty + lift (a prompt effect shared by both arms)."""
    p = np.clip(difficulty + lift, 0.01, 0.99)
    acc = rng.binomial(K * steps, p)
    return PerPrompt(np.full(difficulty.size, steps), acc)


def _population_tau(lift: float, K: int = 8) -> float:
    # E[accepted per step] = K * E[p]; tau = 1 + K * E[p] pooled over equal step counts
    d = np.random.default_rng(123).beta(2, 5, size=400_000)
    return 1 + K * float(np.clip(d + lift, 0.01, 0.99).mean())


def test_seed_se_is_sd_over_sqrt_n():
    assert seed_se([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert seed_se([1.7]) is None


def test_tau_is_the_pooled_engine_ratio():
    r = PerPrompt([10, 30], [5, 45])  # (5 + 45 + 40) / 40
    assert r.tau == pytest.approx(90 / 40)
    assert r.tau_resampled(np.array([[0, 0], [1, 1]])) == pytest.approx([1.5, 2.5])


def test_paired_bootstrap_ci_covers_the_known_difference():
    """95% intervals over 200 synthetic experiments (new prompts each time) cover the population difference
    about 95% of the time; the pairing by prompt makes them much narrower than unpaired noise would."""
    true = _population_tau(0.05) - _population_tau(0.0)
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for rep in range(200):
        d = rng.beta(2, 5, size=64)
        c = contrast([_arm(rng, d, 0.05)], [_arm(rng, d, 0.0)], n_boot=400, seed=rep)
        lo, hi = c["ci95"]
        hits += lo <= true <= hi
        widths.append(hi - lo)
        assert c["se_seeds"] is None and c["se"] == pytest.approx(c["se_prompts"])
    assert 0.90 <= hits / 200 <= 0.99, hits
    # the per-prompt difficulty spread (sd of tau across prompts ~1.3) would make unpaired intervals > 0.5 wide
    assert np.mean(widths) < 0.2


def test_contrast_detects_a_real_effect_and_not_a_null():
    rng = np.random.default_rng(1)
    d = rng.beta(2, 5, size=64)
    big = contrast([_arm(rng, d, 0.08), _arm(rng, d, 0.08)], [_arm(rng, d, 0.0), _arm(rng, d, 0.0)])
    assert big["significant"] and big["diff"] > 0 and big["ci95"][0] > 0
    null = contrast([_arm(rng, d, 0.0), _arm(rng, d, 0.0)], [_arm(rng, d, 0.0), _arm(rng, d, 0.0)])
    assert not null["significant"] and null["ci95"][0] < 0 < null["ci95"][1]


def test_contrast_adds_the_seed_term():
    rng = np.random.default_rng(2)
    d = rng.beta(2, 5, size=64)
    x = [_arm(rng, d, 0.02), _arm(rng, d, 0.06), _arm(rng, d, 0.04)]
    y = [_arm(rng, d, 0.0), _arm(rng, d, 0.0)]
    c = contrast(x, y)
    assert c["seeds_paired"] == 2
    assert c["se_seeds"] == pytest.approx(seed_se([x[0].tau - y[0].tau, x[1].tau - y[1].tau]))
    assert c["se"] == pytest.approx(np.hypot(c["se_prompts"], c["se_seeds"]))
    assert c["diff"] == pytest.approx(np.mean([r.tau for r in x]) - np.mean([r.tau for r in y]))
    m, s = arm_mean_se(x)
    assert m == pytest.approx(np.mean([r.tau for r in x])) and s == pytest.approx(seed_se([r.tau for r in x]))


def test_contrast_refuses_different_prompt_sets():
    with pytest.raises(ValueError, match="same prompts"):
        contrast([PerPrompt([1, 2], [0, 1])], [PerPrompt([1, 2, 3], [0, 1, 1])])
