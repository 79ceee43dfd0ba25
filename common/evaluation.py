"""Held-out evaluation: acceptance length, per-position acceptance, speed against plain target decoding.

Used by `dopd eval` and by the trainers' periodic held-out tau, so a number in a training log and a number from
`dopd eval` are the same measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .drafters import Drafter
from .models import Target
from .specdec import DecodeSettings, EngineStats, SeqResult, SpecEngine


@dataclass
class EvalReport:
    tau: float
    alpha: list[float]
    num_steps: int
    num_prompts: int
    new_tokens: int
    tokens_per_s: float
    wall_s: float
    baseline_tokens_per_s: float | None = None
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
