"""`dopd-experiments plateau` end to end on the tiny target: the gated warm-up, every arm and seed, the reports."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dopd.experiments.cli import app


@pytest.mark.heavy
def test_plateau_smoke(tmp_path):
    out, rep = tmp_path / "run", tmp_path / "report"
    r = CliRunner().invoke(app, ["plateau", "--out", str(out), "--preset", "smoke", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    s = json.loads((rep / "summary.json").read_text())
    for key in ("preset", "drafter", "block_size", "gate", "eval_steps", "seeds", "tau_final", "tau_se", "contrasts"):
        assert key in s, key
    assert set(s["gate"]) == {"tau", "required", "met"} and s["gate"]["met"] == (
        s["gate"]["tau"] >= s["gate"]["required"]
    )
    assert set(s["tau_final"]) == set("ABGCDHP")
    assert s["seeds"] == {"A": 2, "B": 2, "G": 2, "C": 2, "D": 1, "H": 1, "P": 1}
    assert set(s["contrasts"]) == {"B-A", "G-A", "B-C", "G-B", "B-H", "B-D", "B-P"}
    c = s["contrasts"]["B-A"]
    assert c["seeds_paired"] == 2 and c["se_seeds"] is not None and c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert s["contrasts"]["B-H"]["se_seeds"] is None  # H has one seed: training noise not measured, and said so
    # matched optimizer steps and, for A vs B, about the same supervised positions per step
    rows = list(csv.DictReader(open(rep / "results.csv")))
    last = {}
    for row in rows:
        if row["arm"] not in ("warmup", "sft_curve"):
            last[(row["arm"], row["seed"])] = int(row["arm_step"])
    assert set(last.values()) == {4} and len(last) == 11
    assert s["eval_steps"] == int(rows[0]["eval_steps"]) > 0

    # the arms of one seed roll out the same prompts in the same order; seed 1 rolls out another sample, disjoint
    def prompts(arm, seed):
        return [
            json.loads(x)["prompt_id"]
            for x in open(next((out / "arms").glob(f"{arm}_*_s{seed}")) / "opd_sequences.jsonl")
        ]

    b0, b1, a0 = prompts("B", 0), prompts("B", 1), prompts("A", 0)
    assert b0 == a0 and len(set(b0)) == len(set(b1)) == 8 and not set(b0) & set(b1)
    split = json.loads((out / "warmup" / "split.json").read_text())
    assert split["num_rollout"] == 16 and not (set(b0) | set(b1)) & set(split["eval_ids"])
    for seed in (0, 1):
        assert json.loads((next((out / "arms").glob(f"B_*_s{seed}")) / "split.json").read_text())["num_rollout"] == 8
    # the SFT curve: the warm-up evaluated at step 0 and at log-spaced steps up to its last
    assert [c["step"] for c in s["sft_curve"]] == [0, 1, 3, 6] and s["sft_curve"][-1]["tau"] == s["tau_warmup"]
    assert [(g["from_step"], g["to_step"]) for g in s["sft_plateau"]["gains"]] == [(1, 3), (3, 6)]
    assert sum(r["arm"] == "sft_curve" for r in rows) == 4
    cfg_a = yaml.safe_load((next((out / "arms").glob("A_*_s0")) / "config.yaml").read_text())
    assert cfg_a["loss"]["response"] == "ttt" and cfg_a["loss"]["lambda_rej"] == 0

    # A supervises about as many positions per step as B's accepted stream; B and G train the official recipes
    def steps_of(arm):
        return [
            json.loads(x) for x in open(next((out / "arms").glob(f"{arm}_*_s0")) / "metrics.jsonl") if '"step"' in x
        ]

    n_a = sum(r["n_acc"] for r in steps_of("A") if r.get("phase") == "opd")
    n_b = sum(r["n_acc"] for r in steps_of("B") if r.get("phase") == "opd")
    assert 0.5 * n_b <= n_a <= 1.5 * n_b
    for arm, recipe in (("B", "official-2605"), ("G", "official-tv"), ("H", "official-2605"), ("P", "dopd-2511")):
        assert (
            yaml.safe_load((next((out / "arms").glob(f"{arm}_*_s0")) / "config.yaml").read_text())["loss"]["recipe"]
            == recipe
        )
    assert (rep / "plot.png").stat().st_size > 10_000 and "| B-C |" in (rep / "summary.md").read_text()
    # P has its own warm-up (another head): its FLOPs, time and change are counted from that start, not the shared one
    for arm, v in s["arms"].items():
        assert v["learner_flops"] > 0 and v["train_s"] > 0, arm
        assert ("own_warmup" in v) == (arm == "P"), arm
    own = s["arms"]["P"]["own_warmup"]
    assert own["overrides"] == ["drafter.draft_vocab_size=200"] and own["steps"] > 0
    start = next(r for r in rows if r["arm"] == "P")
    assert start["arm_step"] == "0" and float(start["tau"]) == own["tau"]
    assert "P starts from its own warm-up (drafter.draft_vocab_size=200" in (rep / "summary.md").read_text()

    # resumable: a rerun trains nothing (every run's summary exists) and writes the same contrasts
    before = {p: p.stat().st_mtime for p in (out / "arms").glob("*/summary.json")}
    r2 = CliRunner().invoke(app, ["plateau", "--out", str(out), "--preset", "smoke"])
    assert r2.exit_code == 0, r2.output
    assert {p: p.stat().st_mtime for p in (out / "arms").glob("*/summary.json")} == before
    assert json.loads((out / "summary.json").read_text())["contrasts"] == s["contrasts"]


def test_plateau_refuses_unknown_arms_and_presets(tmp_path):
    r = CliRunner().invoke(app, ["plateau", "--out", str(tmp_path), "--preset", "smoke", "--arms", "B,Z"])
    assert r.exit_code != 0 and "unknown arms ['Z']" in r.output
    r = CliRunner().invoke(app, ["plateau", "--out", str(tmp_path), "--preset", "laptop"])
    assert r.exit_code != 0 and "unknown preset 'laptop'" in r.output


def test_committed_plateau_reports_rerender_from_their_results(tmp_path):
    """docs/plateau's (and its side run fresh/ and earlier runs v3/, v2/) summary.md and plot come back from its summary.json and results.csv through the code the
    command runs (`dopd-experiments render`): the experiment left the core without changing what it reports."""
    for src in (Path(__file__).resolve().parents[1] / "docs" / "plateau" / v for v in ("", "fresh", "v3", "v2")):
        d = tmp_path / (src.name or "v3")
        d.mkdir()
        for f in ("summary.json", "results.csv"):
            shutil.copy(src / f, d / f)
        r = CliRunner().invoke(app, ["render", str(d)])
        assert r.exit_code == 0, r.output
        assert (d / "summary.md").read_text() == (src / "summary.md").read_text(), src
        assert (d / "plot.png").stat().st_size > 10_000


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_real_presets_start_the_arms_at_the_warmups_final_learning_rate(preset):
    """The arms resume a warm-up that annealed to lr x min_lr_ratio: a preset whose OPD phase peaks anywhere else
    restarts every arm, SFT included, at another step size (docs/plateau/v3: at 10x, all arms fell below the warm-up)."""
    from dopd.common.load import load_config
    from dopd.experiments.plateau import PRESETS

    P = PRESETS[preset]
    c = load_config(None, P.overrides + P.drafters["dflash"]).learner
    assert c.opd_lr == pytest.approx(c.lr * c.min_lr_ratio)
