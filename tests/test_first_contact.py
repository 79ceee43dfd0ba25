"""A new user's first runs with tiny inputs: what works without ceremony, and errors that name the key that fixes them
(issue 30 item 7)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dopd.cli import app, identity_note
from dopd.common.errors import PromptError
from dopd.common.load import load_config

runner = CliRunner()


def six_conversations(path):
    with open(path, "w") as f:
        for i in range(6):
            turns = [{"from": "human", "value": f"What is {i} + {i}?"}, {"from": "gpt", "value": f"It is {2 * i}."}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return path


def test_data_inspect_needs_no_held_out_split(tmp_path):
    """Six conversations cannot give the default 16 held-out ones; inspecting works anyway and says how to get one."""
    data = six_conversations(tmp_path / "six.jsonl")
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["data", "inspect", str(data), "--target", "tiny-random-llama", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["counts"]["conversations"] == 6 and rep["train"]["examples"] == 6 and rep["held_out"]["examples"] == 0
    assert "set data.num_eval below 6" in rep["held_out"]["note"]
    assert "held-out           none: cannot hold out 16 prompts" in r.output
    # with a split that fits, the held-out part is reported as before
    r = runner.invoke(app, ["data", "inspect", str(data), "--target", "tiny-random-llama", "data.num_eval=2", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert (rep["train"]["examples"], rep["held_out"]["examples"], rep["held_out"]["groups"]) == (4, 2, 2)
    assert "note" not in rep["held_out"]


def test_an_impossible_split_names_the_key_that_fixes_it(tmp_path):
    """Training does need the held-out split: the error says which key to change and to what."""
    from transformers import AutoTokenizer

    from dopd.common.models import resolve_target
    from dopd.prompts import run_prompts

    data = six_conversations(tmp_path / "six.jsonl")
    tok = AutoTokenizer.from_pretrained(resolve_target("tiny-random-llama", quiet=True))
    with pytest.raises(PromptError, match=r"only 6 groups .*set data\.num_eval below 6"):
        run_prompts(load_config(None, [f"data.prompts={data}"]), tok)
    assert len(run_prompts(load_config(None, [f"data.prompts={data}", "data.num_eval=5"]), tok).eval_ids) == 5


@pytest.mark.parametrize("key", ["data.prompts", "data.eval_prompts"])
def test_a_missing_prompt_file_is_reported_before_the_target_is_loaded(tmp_path, monkeypatch, key):
    """`dopd train` and `dopd eval` name the missing file and its key without loading the target first."""
    import dopd.common.models
    import dopd.local

    def no_target(*a, **k):
        raise AssertionError("the target was loaded before the prompt file was checked")

    monkeypatch.setattr(dopd.local, "load_target", no_target)
    monkeypatch.setattr(dopd.common.models, "load_target", no_target)
    missing = tmp_path / "missing.jsonl"
    for args in (["train", f"{key}={missing}", f"out_dir={tmp_path / 'run'}"], ["eval", f"{key}={missing}"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output, r.exception)
        assert f"{key}={missing}: prompt file not found" in r.output, r.output


def test_identity_note_explains_a_16_bit_mismatch():
    assert identity_note(True, "bfloat16") == ""
    note = identity_note(False, "bfloat16")
    assert "bfloat16" in note and "batch shape" in note and "--dtype float32 is the exact check" in note
    assert "a bug" in identity_note(False, "float32")


def test_eval_in_bf16_says_why_it_is_not_identical(monkeypatch):
    """A bf16 `dopd eval` whose speculative output differs from plain decoding prints why, next to the False."""
    import dopd.common.evaluation as evaluation

    real = evaluation.evaluate

    def differing(*a, **k):  # the real decode, reported as one 16-bit rounding mismatch would be
        rep, spec, base = real(*a, **k)
        if rep.identical_to_target is not None:
            rep.identical_to_target = False
        return rep, spec, base

    monkeypatch.setattr(evaluation, "evaluate", differing)
    args = ["eval", "--target", "tiny-random-llama", "--drafter", "init-eagle3", "--prompts", "champ-problems",
            "--num-prompts", "2", "--max-new-tokens", "6", "-k", "2", "--decode"]  # fmt: skip
    r = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("identical to target"))
    assert "False  (bfloat16: the target's logits round differently with the batch shape" in line, line
    r = runner.invoke(app, [*args, "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "False  (float32: speculative greedy decoding must equal plain decoding" in r.output
