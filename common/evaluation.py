"""Held-out evaluation: acceptance length, per-position acceptance, speed against plain target decoding.

Used by `dopd eval`, by both runners' periodic held-out tau (`heldout`) and by the experiments, so a number in a
training log, a number from `dopd eval` and a number in an experiment's table are the same measurement.

The held-out prompts' greedy texts are cached on disk; their prefill features are kept per target for the life of
the process (`heldout_cache`), so every evaluation after the first costs drafter forwards only, whichever run or
experiment arm asks.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch

from .drafters import Drafter
from .errors import PromptError
from .models import Target
from .specdec import DecodeSettings, EngineStats, SeqResult, SpecEngine


@dataclass
class EvalReport:
    tau: float
    alpha: list[float]
    num_steps: int
    num_prompts: int
    new_tokens: int
    tokens_per_s: float | None
    wall_s: float
    baseline_tokens_per_s: float | None = None
    simulated: bool = False  # tau from the cached greedy text and drafter forwards (exact at T = 0; no speeds)
    speedup: float | None = None
    identical_to_target: bool | None = None
    first_mismatch: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def eval_settings(cfg) -> DecodeSettings:
    """The held-out measurement's decoding from a run's config (`eval.*`, the rollout batch, the run's seed): what
    `dopd eval` decodes with (actors/experience.py builds the same for the runners' periodic held-out tau)."""
    return DecodeSettings(
        block_size=cfg.eval_block_size, temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.rollout.batch_size, seed=cfg.seed,
    )  # fmt: skip


def evaluate(
    target: Target,
    drafter: Drafter,
    prompt_ids: list[list[int]],
    settings: DecodeSettings,
    baseline: bool = True,
    progress=None,
) -> tuple[EvalReport, list[SeqResult], list[SeqResult] | None]:
    """Speculative decoding of the prompts, and (optionally) plain target decoding of the same prompts."""
    was_training = drafter.training
    drafter.eval()
    try:
        spec, st = SpecEngine(target, drafter).generate(prompt_ids, settings, progress=progress)
    finally:
        drafter.train(was_training)
    rep = EvalReport(
        tau=st.tau, alpha=st.alpha, num_steps=st.num_steps, num_prompts=len(prompt_ids), new_tokens=st.new_tokens,
        tokens_per_s=st.tokens_per_s, wall_s=st.wall_s,
    )  # fmt: skip
    base = None
    if baseline:
        plain = DecodeSettings(
            block_size=0, temperature=settings.temperature, top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, seed=settings.seed,
        )  # fmt: skip
        base, bst = SpecEngine(target, None).generate(prompt_ids, plain)
        rep.baseline_tokens_per_s = bst.tokens_per_s
        rep.speedup = st.tokens_per_s / bst.tokens_per_s if bst.tokens_per_s else None
        if settings.temperature <= 0:
            rep.identical_to_target = True
            for a, b in zip(spec, base):
                if a.output_ids != b.output_ids:
                    rep.identical_to_target = False
                    i = next((j for j, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y), None)
                    rep.first_mismatch = {
                        "prompt": a.index,
                        "position": i,
                        "spec_len": len(a.output_ids),
                        "target_len": len(b.output_ids),
                    }
                    break
    return rep, spec, base


def quick_tau(target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings) -> EngineStats:
    """tau / alpha only (no baseline): the trainers' periodic held-out measurement."""
    was_training = drafter.training
    drafter.eval()
    try:
        with torch.no_grad():
            _, st = SpecEngine(target, drafter).generate(prompt_ids, settings)
    finally:
        drafter.train(was_training)
    return st


def evaluate_simulated(
    target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings
) -> tuple[EvalReport, list]:
    """`dopd eval --simulate`: the report's tau and alpha without decoding (speeds are not measured: None)."""
    from .greedy import greedy_texts

    t0 = time.perf_counter()
    st = simulated_tau(target, drafter, prompt_ids, settings)
    texts = greedy_texts(target, prompt_ids, settings.max_new_tokens)
    rep = EvalReport(
        tau=st.tau, alpha=st.alpha, num_steps=st.num_steps, num_prompts=len(prompt_ids), new_tokens=st.new_tokens,
        tokens_per_s=None, wall_s=time.perf_counter() - t0, simulated=True,
    )  # fmt: skip
    return rep, texts


_CACHES: dict[int, dict] = {}


def heldout_cache(target: Target) -> dict:
    """The held-out texts and prefill features of `target`, kept while the target lives (one per process)."""
    key = id(target)
    if key not in _CACHES:
        _CACHES[key] = {}
        weakref.finalize(target, _CACHES.pop, key, None)
    return _CACHES[key]


def tau_se(hist: list[int]) -> tuple[float, float, int]:
    """(tau, its standard error treating steps as independent, steps) from the histogram of accepted drafts."""
    n = sum(hist)
    if n == 0:
        return 0.0, float("nan"), 0
    mean = sum((i + 1) * c for i, c in enumerate(hist)) / n
    var = sum((i + 1 - mean) ** 2 * c for i, c in enumerate(hist)) / max(n - 1, 1)
    return mean, math.sqrt(var / n), n


def heldout(
    target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings, simulate: bool = True,
    se_target: float = 0.0, max_passes: int = 1,
) -> dict:  # fmt: skip
    """Held-out tau +- SE, alpha and per-prompt counts (for paired statistics across runs). At T = 0 with `simulate`:
    exact from the cached greedy text (drafter forwards only; also the acceptance of a block started at every answer
    position); otherwise the engine, `settings.acceptance` rule, repeated with seeds settings.seed + 1000 * pass until
    the SE is <= `se_target` or `max_passes` passes ran."""
    t0 = time.perf_counter()
    was_training = drafter.training
    drafter.eval()
    P = len(prompt_ids)
    steps, accepted = [0] * P, [0] * P
    extra: dict = {}
    sim = simulate and settings.temperature <= 0
    try:
        with torch.no_grad():
            if sim:
                st, segs = simulated_segments(target, drafter, prompt_ids, settings)
                hist, passes = [int(h) for h in st.accepted_hist], 1
                steps, accepted = [int(g.accepted.size) for g in segs], [int(g.accepted.sum()) for g in segs]
                every = np.concatenate([g.everywhere for g in segs])
                extra["position_accepted"] = float(every.mean()) if every.size else 0.0
            else:
                hist, passes = [0] * (settings.block_size + 1), 0
                while passes < max(1, max_passes):
                    res, st = SpecEngine(target, drafter).generate(
                        prompt_ids, replace(settings, seed=settings.seed + 1000 * passes)
                    )
                    hist = [a + int(b) for a, b in zip(hist, st.accepted_hist)]
                    for r in res:
                        steps[r.index] += len(r.accepted)
                        accepted[r.index] += int(sum(r.accepted))
                    passes += 1
                    if tau_se(hist)[1] <= se_target:
                        break
    finally:
        drafter.train(was_training)
    stats = EngineStats(num_steps=sum(hist), accepted_hist=hist)
    tau, se, n = tau_se(hist)
    return {
        "tau": stats.tau, "se": se, "steps": n, "alpha": stats.alpha, "hist": hist, "passes": passes,
        "temperature": settings.temperature, "acceptance": settings.acceptance if settings.temperature > 0 else "greedy",
        "simulated": sim, "per_prompt_steps": steps, "per_prompt_accepted": accepted, **extra,
        "eval_s": time.perf_counter() - t0,
    }  # fmt: skip


def simulated_tau(
    target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings, cache: dict | None = None
) -> EngineStats:
    """Exact greedy tau / alpha from the cached greedy text with drafter forwards only (`common/resegment.py`)."""
    return simulated_segments(target, drafter, prompt_ids, settings, cache)[0]


def simulated_segments(
    target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings, cache: dict | None = None
) -> tuple[EngineStats, list]:
    """`simulated_tau` plus every prompt's segmentation (steps, accepted drafts, acceptance at every position).
    `cache`: where the prompts' texts and prefill features are kept (default: the target's `heldout_cache`)."""
    from .greedy import greedy_texts, prefill
    from .resegment import segment, stats_of

    if settings.temperature > 0:
        raise PromptError(
            f"simulated tau is exact for greedy decoding only (temperature {settings.temperature} > 0): evaluate without --simulate"
        )
    SpecEngine(target, drafter).check_prompts(prompt_ids, settings)
    K = settings.block_size
    cache = heldout_cache(target) if cache is None else cache
    key = lambda p: (tuple(p), settings.max_new_tokens, tuple(drafter.feature_layers))  # noqa: E731
    todo = [p for p in prompt_ids if key(p) not in cache]
    if todo:
        texts = greedy_texts(target, todo, settings.max_new_tokens, capture=(drafter.feature_layers, 1))
        read = [t for t in texts if t.decoded is None]  # cached texts: read once for their features
        pre = iter(
            prefill(target, drafter.feature_layers, [("", t.tokens, t.prompt_len) for t in read], 1) if read else []
        )
        for p, t in zip(todo, texts):
            cache[key(p)] = (t, t.decoded.features if t.decoded is not None else next(pre).features)
            t.decoded = None  # the features are kept above; the rest of the decoding record is not needed
    t0 = time.perf_counter()
    texts, feats = zip(*[cache[key(p)] for p in prompt_ids])
    segs = segment(drafter, list(texts), list(feats), K, batch_size=settings.batch_size, dtype=target.dtype)
    return stats_of(segs, K, sum(len(t.answer) for t in texts), time.perf_counter() - t0), segs
