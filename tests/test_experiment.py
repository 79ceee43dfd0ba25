"""`dopd experiment plateau` end to end on the tiny target: every arm, matched FLOPs, every report file."""

from __future__ import annotations

import csv
import json

import yaml

from typer.testing import CliRunner

from dopd.cli import app


def test_plateau_smoke(tmp_path):
    r = CliRunner().invoke(app, ["experiment", "plateau", "--out", str(tmp_path), "--preset", "smoke"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["tau_final"]) == {"sft", "sft_on_opd_data", "opd", "opd_random_anchors", "opd_gamma1"}
    for key in ("tau_warmup", "learner_flops", "target", "drafter", "drafter_params", "block_size", "eval_prompts", "command"):
        assert key in s, key
    # matched learner FLOPs: every arm stops within one step past the same budget
    spent = s["learner_flops_per_arm"]
    assert all(s["learner_flops"] <= f < 2.5 * s["learner_flops"] for f in spent.values()), spent
    assert s["opd_rollout_tokens_per_s"] > 0 and abs(sum(s["opd_time_share"].values()) - 1) < 1e-6
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["arm"] for r in rows} == {"warmup", *s["tau_final"]}
    assert (tmp_path / "plot.png").stat().st_size > 10_000 and "| opd |" in (tmp_path / "summary.md").read_text()
    # arm (b) trained on exactly the sequences arm (c) rolled out
    cfg_b = yaml.safe_load((tmp_path / "sft_on_opd_data" / "config.yaml").read_text())
    assert cfg_b["sft"]["sequences"] == str(tmp_path / "opd" / "opd_sequences.jsonl")
    assert sum(1 for _ in open(tmp_path / "opd" / "opd_sequences.jsonl")) > 0
    ro = [json.loads(x) for x in open(tmp_path / "opd_random_anchors" / "metrics.jsonl") if '"rollout"' in x]
    assert ro and all(r["replay_anchors"] >= 0 for r in ro)
