"""The learning-rate schedule: each phase (SFT warm-up, Draft-OPD) warms up linearly and decays by a cosine to
`learner.min_lr_ratio` at its own last step; `constant` keeps the peak after the warm-up."""

from __future__ import annotations

import math

import pytest
import torch

from dopd.common.config import ConfigError
from dopd.common.load import load_config
from dopd.learner.optim import lr_factor, make_optimizer


def cfg(*extra):
    return load_config(
        None,
        [
            "mode=opd",
            "sft.warmup_steps=20",
            "learner.steps=11",
            "learner.warmup_steps=4",
            "learner.min_lr_ratio=0.1",
            *extra,
        ],
    )


def test_each_phase_warms_up_then_decays_to_the_floor_at_its_last_step():
    c = cfg()
    f = [lr_factor(s, c) for s in range(31)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[19] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[3:20], f[4:20]))
    # the OPD phase starts its own warm-up at step 20 and ends on the floor at step 30
    assert f[20:24] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and f[30] == pytest.approx(0.1)
    # step 11: 7 of the 15 decay steps (4..19) done
    assert f[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_constant_keeps_the_peak_and_the_optimizer_follows_the_schedule():
    assert [lr_factor(s, cfg("learner.lr_schedule=constant")) for s in (3, 19, 25, 30)] == [1.0, 1.0, 1.0, 1.0]
    c = cfg("learner.lr=0.01")
    m = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(m, c)
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.0025) and seen[19] == pytest.approx(0.001) and seen[20] == pytest.approx(0.0025)


def test_a_floor_outside_zero_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        cfg("learner.min_lr_ratio=1.5")


def test_the_opd_phase_peaks_at_its_own_rate():
    c = cfg("learner.lr=0.01", "learner.opd_lr=0.002")
    assert (
        lr_factor(3, c) == pytest.approx(1.0)
        and lr_factor(23, c) == pytest.approx(0.2)
        and lr_factor(30, c) == pytest.approx(0.02)
    )
    with pytest.raises(ConfigError, match="opd_lr"):
        cfg("learner.opd_lr=0")
