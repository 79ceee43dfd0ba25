"""`dopd eval --drafter init-dvi` (greedy, identical to the target) and the side-by-side acceptance report at T > 0."""

from __future__ import annotations

import json

from helpers import assert_counts_agree
from typer.testing import CliRunner

from dopd.cli import app

runner = CliRunner()
BASE = ["eval", "--target", "tiny-random-llama", "--prompts", "champ-problems", "--num-prompts", "3", "--max-new-tokens", "12",
        "--block-size", "3", "--threads", "1", "--decode"]  # fmt: skip


def test_eval_init_dvi_is_lossless(tmp_path):
    out = tmp_path / "e.json"
    dump = tmp_path / "o.jsonl"
    r = runner.invoke(app, [*BASE, "--drafter", "init-dvi", "--json", str(out), "--dump-outputs", str(dump)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["drafter_kind"] == "dvi" and rep["identical_to_target"] is True
    assert_counts_agree(rep, [json.loads(x) for x in dump.read_text().splitlines()], 3)
    # the engine's tau against the re-segmentation of the target's cached greedy text (another code path)
    sim = tmp_path / "s.json"
    r = runner.invoke(app, [*BASE[:-1], "--simulate", "--drafter", "init-dvi", "--json", str(sim)])
    assert r.exit_code == 0, r.output
    s = json.loads(sim.read_text())
    assert (s["tau"], s["alpha"], s["num_steps"]) == (rep["tau"], rep["alpha"], rep["num_steps"])
    assert "acceptance" not in rep  # greedy: one acceptance rule


def test_eval_at_t_above_zero_reports_both_acceptance_rules(tmp_path):
    out = tmp_path / "e.json"
    dump = tmp_path / "o.jsonl"
    r = runner.invoke(
        app,
        [
            *BASE,
            "--drafter",
            "init-dvi",
            "--temperature",
            "1.0",
            "--no-baseline",
            "--json",
            str(out),
            "--dump-outputs",
            str(dump),
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    acc = rep["acceptance"]
    assert set(acc) == {"rejection_sampling", "greedy_match"}
    assert all(v["steps"] > 0 and len(v["alpha"]) == 3 for v in acc.values())
    assert acc["rejection_sampling"]["tau"] == rep["tau"]
    assert_counts_agree(rep, [json.loads(x) for x in dump.read_text().splitlines()], 3)  # rejection sampling's run
    assert "greedy match tau" in r.output
