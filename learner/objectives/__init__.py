"""Objectives: what the learner optimises. Each is one object in one module that registers itself here
(`register`); `loss.objective=<name>` picks one for the rollout phase, `SFT` trains the warm-up. A new objective is a
new module and one import line below (its math may use learner/losses.py); the registry itself lives in base.py, so
the modules import no package `__init__` that imports them. See base.py for the interface."""

from __future__ import annotations

from dopd.common.config import Config

from .base import OBJECTIVES, Mask, Objective, logq, register

# the objectives (registration order = the order they are listed in errors)
from . import opd, dvi, expected_length, e2e_tv, lk  # noqa: F401  isort: skip
from .sft import SFT  # noqa: E402  isort: skip


def objective_for(cfg: Config, phase: str) -> Objective:
    """The objective a learner step of this phase trains: the warm-up's SFT, or `loss.objective` on rollouts."""
    if phase == "sft":
        return SFT(cfg)
    if phase != "opd":
        raise ValueError(f"unknown training phase '{phase}' (sft or opd)")
    return OBJECTIVES[cfg.loss.objective](cfg)


__all__ = ["OBJECTIVES", "SFT", "Mask", "Objective", "logq", "objective_for", "register"]
