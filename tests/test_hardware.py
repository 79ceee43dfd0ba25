"""dtype=auto by measurement (common/hardware.py): the decision from injected timings, its cache, the machine line."""

from __future__ import annotations

import json

import pytest

from dopd.common import hardware


def test_choose_dtype_from_injected_timings():
    assert hardware.choose_dtype({"float32": 1.0, "bfloat16": 0.4})[0] == "bfloat16"
    assert hardware.choose_dtype({"float32": 1.0, "bfloat16": 0.9})[0] == "bfloat16"  # exactly at the margin
    dt, why = hardware.choose_dtype({"float32": 1.0, "bfloat16": 0.95})
    assert dt == "float32" and "1.05x" in why  # faster, but not by the margin: the exact reference stays
    dt, why = hardware.choose_dtype({"float32": 1.0, "bfloat16": 2.5})
    assert dt == "float32" and "0.40x" in why  # an AVX512-BF16-less CPU emulating bf16
    assert hardware.choose_dtype({"float32": 1.0, "bfloat16": None}) == ("float32", "bf16 matmuls do not run here")
    assert hardware.choose_dtype({"float32": 1.0, "bfloat16": 0.5}, margin=0.4)[0] == "float32"


def test_choose_dtype_refuses_missing_fp32():
    with pytest.raises(ValueError, match="float32"):
        hardware.choose_dtype({"bfloat16": 0.5})


def test_auto_dtype_is_measured_once_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_DECIDED", {})
    calls = []

    def slow_bf16():
        calls.append(1)
        return {"float32": 1.0, "bfloat16": 3.0}

    assert hardware.auto_cpu_dtype(probe=slow_bf16)[0] == "float32"
    assert "dtype=auto -> float32" in capsys.readouterr().err
    files = list((tmp_path / "hardware").glob("dtype-*.json"))
    assert len(files) == 1 and hardware.machine_key() in files[0].name
    saved = json.loads(files[0].read_text())
    assert saved["dtype"] == "float32" and saved["timings"]["bfloat16"] == 3.0 and saved["torch"]
    # a new process (empty in-process memo) reads the disk cache and does not measure again
    monkeypatch.setattr(hardware, "_DECIDED", {})
    dt, why = hardware.auto_cpu_dtype(probe=lambda: {"float32": 1.0, "bfloat16": 0.1})
    assert (dt, len(calls)) == ("float32", 1) and why.endswith("(cached)")
    # another machine (key) measures afresh
    monkeypatch.setattr(hardware, "_DECIDED", {})
    monkeypatch.setattr(hardware, "machine_key", lambda: "other-machine")
    assert hardware.auto_cpu_dtype(probe=lambda: {"float32": 1.0, "bfloat16": 0.1})[0] == "bfloat16"


def test_resolve_dtype_auto_uses_the_measurement(tmp_path, monkeypatch):
    from dopd.common import models

    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_DECIDED", {})
    monkeypatch.setattr(models, "native_bf16", lambda dev: True)
    monkeypatch.setattr(hardware, "probe_timings", lambda: {"float32": 1.0, "bfloat16": 2.0})
    assert models.resolve_dtype("auto", "cpu", quiet=True) == "float32"
    monkeypatch.setattr(models, "native_bf16", lambda dev: False)
    assert models.resolve_dtype("auto", "cpu") == "float32"
    assert models.resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_probe_and_machine_line_are_real():
    t = hardware.probe_timings(rows=(1,), repeats=1)
    assert t["float32"] > 0 and (t["bfloat16"] is None or t["bfloat16"] > 0)
    line = hardware.describe()
    assert hardware.cpu_model() in line and "cores" in line and "load average" in line
