"""`dopd-experiments methods --preset smoke`: every arm of both groups on the tiny target, the reports, and a re-run
that skips what is finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dopd.experiments.cli import app
from dopd.experiments.methods import ARMS, T1_ARMS, markdown, methods, tau_se


def test_tau_se_from_the_histogram():
    tau, se, n = tau_se([2, 0, 2])  # accepted 0,0,2,2 -> tau values 1,1,3,3
    assert (tau, n) == (2.0, 4) and abs(se - (4 / 3) ** 0.5 / 2) < 1e-12


@pytest.mark.heavy
def test_methods_smoke_runs_every_arm_and_resumes(tmp_path):
    logs: list[str] = []
    s = methods(tmp_path, "smoke", [], log=logs.append)
    assert set(s["arms"]) == set(ARMS)
    for arm, a in s["arms"].items():
        res = a["final"]["results"]
        if arm in T1_ARMS:
            assert a["temperature"] == 1.0 and set(res) == {"rejection", "match"}
            assert all(not r["simulated"] and r["steps"] > 0 for r in res.values())
        else:
            assert a["temperature"] == 0.0 and set(res) == {"greedy"} and res["greedy"]["simulated"]
        assert all(r["se"] >= 0 and r["se_prompts"] >= 0 for r in res.values())
        # per-prompt records add up to the measurement (they feed the paired contrasts; tau is checked by them)
        for r in res.values():
            st, acc = r["per_prompt_steps"], r["per_prompt_accepted"]
            assert len(st) == 3 and sum(st) == r["steps"] and abs((sum(acc) + sum(st)) / sum(st) - r["tau"]) < 1e-9
        assert a["learner_steps"] == 4 and a["learner_flops"] > 0
        assert a["time_s"]["learner_s"] > 0 and all(v >= 0 for v in a["time_s"].values())
    assert s["arms"]["dvi_kl"]["kind"] == "dvi" and s["arms"]["eagle3_kl_rl"]["kind"] == "eagle3"

    # the KL -> RL arm switched half way through its budget; the KL-only arm never did
    def phases(arm):
        return [
            json.loads(x).get("dvi_phase")
            for x in open(tmp_path / arm / "metrics.jsonl")
            if json.loads(x)["event"] == "step"
        ]

    assert phases("dvi_kl_rl") == ["kl", "kl", "rl", "rl"] and phases("dvi_kl") == ["kl"] * 4
    for f in ("results.json", "results.csv", "summary.md"):
        assert (tmp_path / f).is_file()
    assert "| bebop_e2e | eagle3 |" in (tmp_path / "summary.md").read_text()
    c = s["contrasts"]
    assert {
        "opd_kl - sft_kl",
        "dvi_kl_rl - dvi_kl",
        "eagle3_kl_rl - dvi_kl_rl",
        "bebop_e2e - warm-up",
        "bebop_tv: match - rejection",
    } <= set(c)
    d = c["dvi_kl_rl - dvi_kl"]
    a, b = (s["arms"][k]["final"]["results"]["greedy"]["tau"] for k in ("dvi_kl_rl", "dvi_kl"))
    assert abs(d["diff"] - (a - b)) < 1e-9 and d["se"] >= 0 and d["prompts"] == 3 and d["se_seeds"] is None
    assert "| dvi_kl_rl - dvi_kl |" in (tmp_path / "summary.md").read_text()
    # a second call trains and measures nothing again
    before = {arm: (tmp_path / arm / "summary.json").stat().st_mtime for arm in ARMS}
    logs.clear()
    s2 = methods(tmp_path, "smoke", [], log=logs.append)
    assert not any(line.startswith("==") for line in logs)
    assert before == {arm: (tmp_path / arm / "summary.json").stat().st_mtime for arm in ARMS}
    assert markdown(s2) == markdown(s)


@pytest.mark.heavy
def test_an_arm_another_live_process_runs_is_skipped_not_wiped(tmp_path):
    """Arms split over processes on one --out: an arm whose lock a live process holds is left alone (its directory
    untouched, not in this call's results); a lock left by a dead process is taken over and released."""
    import os
    import subprocess
    import sys

    methods(tmp_path, "smoke", [], arms=("dvi_kl",), log=lambda m: None)
    adir = tmp_path / "dvi_kl"
    (adir / "summary.json").unlink()  # as if still training
    before = (adir / "metrics.jsonl").stat().st_mtime
    (tmp_path / "dvi_kl.lock").write_text(str(os.getpid()))  # held by a live process (this one)
    logs: list[str] = []
    s = methods(tmp_path, "smoke", [], arms=("dvi_kl",), log=logs.append)
    assert "dvi_kl" not in s["arms"] and any("being run by another process" in m for m in logs)
    assert (adir / "metrics.jsonl").stat().st_mtime == before and not (adir / "summary.json").exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "dvi_kl.lock").write_text(dead)
    logs.clear()
    s = methods(tmp_path, "smoke", [], arms=("dvi_kl",), log=logs.append)
    assert "dvi_kl" in s["arms"] and "== arm dvi_kl" in logs and not (tmp_path / "dvi_kl.lock").exists()


def test_committed_methods_reports_rerender_from_their_results(tmp_path):
    """docs/methods' summary.md and results.csv come back from its results.json (`dopd-experiments render`)."""
    src = Path(__file__).resolve().parents[1] / "docs" / "methods"
    shutil.copy(src / "results.json", tmp_path / "results.json")
    r = CliRunner().invoke(app, ["render", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for f in ("summary.md", "results.csv"):
        assert (tmp_path / f).read_text() == (src / f).read_text(), f
    r = CliRunner().invoke(app, ["render", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "holds no experiment results" in r.output
