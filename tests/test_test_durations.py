"""bench/test_durations.py reads pytest's --durations lines: costs summed per test, both phases' walls found."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "test_durations_bench", Path(__file__).parents[1] / "bench" / "test_durations.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

SERIAL = """
============================= slowest 3 durations =============================
190.60s call     tests/test_soak.py::test_soak
15.85s setup    tests/test_serve.py::test_models
12.00s call     tests/test_serve.py::test_models
458 passed, 58 warnings in 1590.80s (0:26:30)
"""
TWO_PHASES = """
12.5s setup    tests/test_serve.py::test_models
420 passed, 3 warnings in 480.00s (0:08:00)
180.0s call     tests/test_soak.py::test_soak
1 failed, 38 passed in 800.50s (0:13:20)
"""


def test_setup_and_call_add_up_and_every_summary_counts():
    assert bench.durations(SERIAL) == {
        "tests/test_soak.py::test_soak": 190.6,
        "tests/test_serve.py::test_models": 27.85,
    }
    assert bench.walls(TWO_PHASES) == [(420, 0, 480.0), (38, 1, 800.5)]
    t = bench.table(SERIAL, TWO_PHASES, top=1)
    assert t.splitlines()[1].split() == ["190.6s", "180.0s", "tests/test_soak.py::test_soak"]
    assert "= 1280 s" in t and "= 1591 s" in t and "(38 passed, 1 failed)" in t


def test_a_log_without_durations_is_refused():
    with pytest.raises(SystemExit, match="no --durations lines"):
        bench.table("458 passed in 3.0s", TWO_PHASES, top=10)
