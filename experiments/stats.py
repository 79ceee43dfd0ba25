"""Uncertainty of an experiment's tau: standard errors over seeds and paired bootstrap contrasts over prompts.

Why two sources: a held-out tau is a ratio over a finite set of prompts (evaluation noise: another set of prompts
gives another tau) and it comes from one training run (training noise: another seed's prompt order gives another
drafter). Every arm is evaluated on the SAME prompts, so a contrast between two arms is paired by prompt: the
bootstrap resamples prompts once for both arms, which cancels the prompts' shared difficulty. Training noise is
measured by the spread of the per-seed differences (seeds paired: seed s of both arms saw the same prompts in the
same order). The two are independent, so the contrast's standard error is sqrt(se_prompts^2 + se_seeds^2); with one
seed the seed term is unknown and the contrast says so (`se_seeds` None).

tau is the engine's: (sum over steps of accepted + 1) / steps, pooled over prompts (a ratio estimator, not a mean
of per-prompt taus), so per prompt we keep the step count and the accepted-draft sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIGNIFICANT_SE = 3.0  # an effect counts when |diff| exceeds this many standard errors of the difference


@dataclass
class PerPrompt:
    """One evaluation, prompt by prompt: verification steps and accepted drafts summed over them."""

    steps: np.ndarray  # [P] int
    accepted: np.ndarray  # [P] int

    def __post_init__(self) -> None:
        self.steps = np.asarray(self.steps, dtype=np.float64)
        self.accepted = np.asarray(self.accepted, dtype=np.float64)
        if self.steps.shape != self.accepted.shape or self.steps.ndim != 1:
            raise ValueError(f"steps {self.steps.shape} and accepted {self.accepted.shape} must be equal 1-d arrays")

    @property
    def tau(self) -> float:
        return float((self.accepted.sum() + self.steps.sum()) / self.steps.sum())

    def tau_resampled(self, idx: np.ndarray) -> np.ndarray:
        """tau for each row of prompt indices idx [B, P] (bootstrap resamples)."""
        s, a = self.steps[idx].sum(-1), self.accepted[idx].sum(-1)
        return (a + s) / s


def seed_se(values) -> float | None:
    """Standard error of the mean over seeds (sample sd / sqrt(n)); None with fewer than 2 seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    return float(v.std(ddof=1) / np.sqrt(v.size))


def _mean_tau(runs: list[PerPrompt], idx: np.ndarray | None) -> np.ndarray | float:
    if idx is None:
        return float(np.mean([r.tau for r in runs]))
    return np.mean([r.tau_resampled(idx) for r in runs], axis=0)


def contrast(x: list[PerPrompt], y: list[PerPrompt], n_boot: int = 2000, seed: int = 0) -> dict:
    """Arm x minus arm y: the difference of seed-mean taus, its SE and a 95% interval.

    x[s] and y[s] are seed s of each arm, evaluated on the same prompts (same order). Seeds present in both are
    paired for the seed term; the point estimate uses every seed of each arm.
    """
    if not x or not y:
        raise ValueError("a contrast needs at least one evaluation of each arm")
    P = x[0].steps.size
    if any(r.steps.size != P for r in x + y):
        raise ValueError("every evaluation in a contrast must cover the same prompts")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, P, size=(n_boot, P))
    diff = _mean_tau(x, None) - _mean_tau(y, None)
    boot = _mean_tau(x, idx) - _mean_tau(y, idx)
    se_prompts = float(boot.std(ddof=1))
    n_pair = min(len(x), len(y))
    se_seeds = seed_se([x[s].tau - y[s].tau for s in range(n_pair)])
    se = float(np.hypot(se_prompts, se_seeds or 0.0))
    lo, hi = np.percentile(boot - diff, [2.5, 97.5])
    return {
        "diff": float(diff),
        "se": se,
        "se_prompts": se_prompts,
        "se_seeds": se_seeds,  # None: one paired seed, training noise not measured
        "ci95": [float(diff - 1.96 * se), float(diff + 1.96 * se)],
        "ci95_prompts_bootstrap": [float(diff - hi), float(diff - lo)],  # basic bootstrap interval, prompts only
        "seeds_paired": n_pair,
        "prompts": P,
        "significant": bool(abs(diff) > SIGNIFICANT_SE * se),
    }


def arm_mean_se(runs: list[PerPrompt], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """An arm's seed-mean tau and its SE: over seeds when there are >= 2, else the bootstrap over prompts."""
    taus = [r.tau for r in runs]
    s = seed_se(taus)
    if s is None:
        P = runs[0].steps.size
        idx = np.random.default_rng(seed).integers(0, P, size=(n_boot, P))
        s = float(runs[0].tau_resampled(idx).std(ddof=1))
    return float(np.mean(taus)), s
