"""model.compile (common/compile.py): the compiled lean steps are lossless in fp32, `auto` decides by measurement."""

from __future__ import annotations

import json

import pytest

from dopd.common import compile as dcompile
from dopd.common.drafters import drafter_for_target
from dopd.common.models import load_target
from dopd.common.specdec import DecodeSettings, SpecEngine
from dopd.common.target_forward import LeanForward


@pytest.mark.heavy
def test_compiled_speculative_fp32_is_bit_exact_with_plain_decoding(tiny_prompts, tmp_path, monkeypatch):
    """Greedy speculative decoding whose target steps run compiled (one-token and K+1-token graphs, rows finishing
    at different steps) commits exactly the tokens of plain eager decoding; the compiled graphs really ran."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo

    torch._dynamo.reset()
    plain = SpecEngine(load_target("tiny-random-llama", "cpu", "float32", quiet=True, forward="lean"))
    settings = DecodeSettings(block_size=0, max_new_tokens=24, batch_size=3)
    ref = [r.output_ids for r in plain.generate(tiny_prompts, settings)[0]]
    t = load_target("tiny-random-llama", "cpu", "float32", quiet=True, compile="on")
    fwd = t.forward
    assert isinstance(fwd, LeanForward) and fwd._compiled is not None
    calls = []
    inner = fwd._compiled
    fwd._compiled = lambda *a, **k: calls.append(a[0].shape) or inner(*a, **k)
    spec = SpecEngine(t, drafter_for_target("init-eagle3", t))
    res, st = spec.generate(tiny_prompts, DecodeSettings(block_size=4, max_new_tokens=24, batch_size=3))
    assert [r.output_ids for r in res] == ref
    assert calls and all(s[1] == 5 for s in calls) and st.num_steps >= len(calls)
    compiled_plain = SpecEngine(t).generate(tiny_prompts, settings)[0]
    assert [r.output_ids for r in compiled_plain] == ref
    assert any(s[1] == 1 for s in calls)  # the one-token decode graph ran too
    assert any((tmp_path / "inductor").rglob("*")), "inductor wrote nothing under its cache directory"


def test_choose_from_injected_timings():
    on, why = dcompile.choose({1: 1.0, 64: 2.0}, {1: 0.5, 64: 1.5})
    assert on and "batch 1: 2.00x" in why
    on, why = dcompile.choose({1: 1.0, 64: 2.0}, {1: 0.5, 64: 1.9})  # slower than the margin at batch 64
    assert not on and "batch 64: 1.05x" in why
    assert not dcompile.choose({1: 1.0}, {1: 1.2})[0]
    with pytest.raises(ValueError, match="same batch sizes"):
        dcompile.choose({1: 1.0}, {64: 1.0})


def test_auto_is_measured_once_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    t = load_target("tiny-random-llama", "cpu", "float32", quiet=True, compile="auto")
    calls = []

    def measure(target):
        calls.append(target.name)
        return {1: 1.0, 16: 1.0}, {1: 0.5, 16: 0.7}

    assert dcompile.decide_auto(t, measure) is True
    assert "model.compile=auto -> on" in capsys.readouterr().err
    saved = json.loads(next((tmp_path / "inductor").glob("auto-*.json")).read_text())
    assert saved["compile"] is True and saved["eager_s"] == {"1": 1.0, "16": 1.0}
    assert dcompile.decide_auto(t, lambda _: ({1: 1.0}, {1: 9.0})) is True and calls == ["tiny-random-llama"]
    # another dtype is another decision
    t16 = load_target("tiny-random-llama", "cpu", "bfloat16", quiet=True, compile="auto")
    assert dcompile.decide_auto(t16, lambda _: ({1: 1.0}, {1: 9.0})) is False


def test_auto_off_keeps_the_eager_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    from dopd.common import target_forward

    monkeypatch.setattr(target_forward, "measure_steps", lambda target: ({1: 1.0}, {1: 2.0}))
    t = load_target("tiny-random-llama", "cpu", "float32", quiet=True, compile="auto")
    assert isinstance(t.forward, LeanForward) and t.forward._compiled is None
    assert load_target("tiny-random-llama", "cpu", "float32", quiet=True, compile="off").compile_on() is False
    hf = load_target("tiny-random-llama", "cpu", "float32", quiet=True, forward="hf", compile="on")
    assert hf.compile_on() is False  # only the lean forward compiles


def test_bad_compile_mode_is_refused():
    with pytest.raises(ValueError, match="model.compile 'fast'"):
        load_target("tiny-random-llama", "cpu", "float32", quiet=True, compile="fast")
    with pytest.raises(ValueError, match="compile must be on or off"):
        LeanForward(load_target("tiny-random-llama", "cpu", "float32", quiet=True).model, compile="auto")
