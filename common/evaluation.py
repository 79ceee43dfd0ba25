"""Held-out evaluation: acceptance length, per-position acceptance, speed against plain target decoding.

Used by `dopd eval` and by the trainers' periodic held-out tau, so a number in a training log and a number from
`dopd eval` are the same measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
                    rep.first_mismatch = {"prompt": a.index, "position": i, "spec_len": len(a.output_ids), "target_len": len(b.output_ids)}
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


def evaluate_simulated(target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings) -> tuple[EvalReport, list]:
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


def simulated_tau(target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings, cache: dict | None = None) -> EngineStats:
    """Exact greedy tau / alpha from the cached greedy text with drafter forwards only (`common/resegment.py`).

    `cache` (optional, per process) keeps each prompt's text and prefill features between calls: a trainer's
    periodic held-out evaluation then costs drafter forwards only.
    """
    return simulated_segments(target, drafter, prompt_ids, settings, cache)[0]


def simulated_segments(
    target: Target, drafter: Drafter, prompt_ids: list[list[int]], settings: DecodeSettings, cache: dict | None = None
) -> tuple[EngineStats, list]:
    """`simulated_tau` plus every prompt's segmentation (steps, accepted drafts, acceptance at every position)."""
    from .greedy import greedy_texts, prefill
    from .resegment import segment, stats_of

    if settings.temperature > 0:
        raise PromptError(f"simulated tau is exact for greedy decoding only (temperature {settings.temperature} > 0): evaluate without --simulate")
    SpecEngine(target, drafter).check_prompts(prompt_ids, settings)
    K = settings.block_size
    cache = {} if cache is None else cache
    key = lambda p: (tuple(p), settings.max_new_tokens, tuple(drafter.feature_layers))  # noqa: E731
    todo = [p for p in prompt_ids if key(p) not in cache]
    if todo:
        texts = greedy_texts(target, todo, settings.max_new_tokens)
        pre = prefill(target, drafter.feature_layers, [("", t.tokens, t.prompt_len) for t in texts], 1)
        for p, t, r in zip(todo, texts, pre):
            cache[key(p)] = (t, r.features)
    t0 = time.perf_counter()
    texts, feats = zip(*[cache[key(p)] for p in prompt_ids])
    segs = segment(drafter, list(texts), list(feats), K, batch_size=settings.batch_size, dtype=target.dtype)
    return stats_of(segs, K, sum(len(t.answer) for t in texts), time.perf_counter() - t0), segs
