"""`dopd eval --drafter init-dvi` (greedy, identical to the target) and the side-by-side acceptance report at T > 0."""

from __future__ import annotations

import json

from helpers import assert_tau_consistent
from typer.testing import CliRunner

from dopd.cli import app

runner = CliRunner()
BASE = ["eval", "--target", "tiny-random-llama", "--prompts", "champ-problems", "--num-prompts", "3", "--max-new-tokens", "12",
        "--block-size", "3", "--threads", "1"]  # fmt: skip


def test_eval_init_dvi_is_lossless(tmp_path):
    out = tmp_path / "e.json"
    r = runner.invoke(app, [*BASE, "--drafter", "init-dvi", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["drafter_kind"] == "dvi" and rep["identical_to_target"] is True
    assert_tau_consistent(rep["tau"], rep["alpha"], 3)
    assert "acceptance" not in rep  # greedy: one acceptance rule


def test_eval_at_t_above_zero_reports_both_acceptance_rules(tmp_path):
    out = tmp_path / "e.json"
    r = runner.invoke(
        app, [*BASE, "--drafter", "init-dvi", "--temperature", "1.0", "--no-baseline", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    acc = json.loads(out.read_text())["acceptance"]
    assert set(acc) == {"rejection_sampling", "greedy_match"}
    assert all(v["steps"] > 0 and len(v["alpha"]) == 3 for v in acc.values())
    for v in acc.values():
        assert_tau_consistent(v["tau"], v["alpha"], 3)
    assert "greedy match tau" in r.output
