"""`dopd-experiments serve-shift` without a server: the traffic / held-out split (disjoint from what `dopd eval`
scores, on the tiny target's tokenizer), the paired statistics and the verdict rule on hand-computed numbers, the
/metrics parsing on a replica's real series, and refusals of bad input before anything starts."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from dopd.common.errors import DopdError
from dopd.experiments import serve_shift as ss


@pytest.fixture(scope="module")
def humaneval():
    from dopd.prompts import load_prompt_set

    return load_prompt_set("humaneval")


def _scored(tokenizer, held_out: int, seed: int) -> list[str]:
    """The ids `dopd eval` scores (its own code path: heldout_examples, then the first eval.num_prompts)."""
    from dopd.common.load import load_config
    from dopd.prompts import heldout_examples

    # the tiny tokenizer is ~3x longer than SmolLM2's: a prompt over data.max_prompt_tokens would not be scored
    cfg = load_config(None, ["model.target=tiny-random-llama", "data.prompts=humaneval", f"data.num_eval={held_out}",
                             f"eval.num_prompts={held_out}", f"data.seed={seed}", "data.max_prompt_tokens=2048"])  # fmt: skip
    return [p.id for p in heldout_examples(cfg, tokenizer).prompts[: cfg.eval.num_prompts]]


@pytest.mark.parametrize("held_out, n_traffic, seed", [(16, 148, 0), (64, 100, 0), (8, 20, 3)])
def test_traffic_never_contains_a_prompt_dopd_eval_scores(tiny, humaneval, held_out, n_traffic, seed):
    traffic, held = ss.traffic_split(humaneval, held_out, seed, n_traffic)
    scored = _scored(tiny.tokenizer, held_out, seed)
    ids = [p.id for p in traffic]
    assert len(humaneval) == 164 and len(ids) == n_traffic == len(set(ids))
    assert len(scored) == held_out and not set(ids) & set(scored)
    assert sorted(p.id for p in held) == sorted(scored)  # our held-out split is dopd eval's
    assert set(ids) | set(scored) <= {p.id for p in humaneval}


def test_the_split_follows_its_seed(humaneval):
    a, _ = ss.traffic_split(humaneval, 16, 0, 50)
    b, _ = ss.traffic_split(humaneval, 16, 0, 50)
    c, _ = ss.traffic_split(humaneval, 16, 1, 50)
    assert [p.id for p in a] == [p.id for p in b] != [p.id for p in c]


def test_overlap_and_oversized_traffic_are_refused(humaneval):
    with pytest.raises(DopdError, match="1 traffic prompt.*HumanEval/3"):
        ss.check_disjoint(["HumanEval/1", "HumanEval/3"], ["HumanEval/3", "HumanEval/9"], "the scored set")
    ss.check_disjoint(["a"], ["b"], "x")
    with pytest.raises(DopdError, match="only 100 humaneval prompts are left after holding out 64"):
        ss.traffic_split(humaneval, 64, 0, 101)
    with pytest.raises(DopdError, match=">= 1"):
        ss.traffic_split(humaneval, 0, 0, 10)
    with pytest.raises(DopdError, match="steps=0"):
        ss.Sizes(steps=0)


def test_paired_difference_and_its_se_on_hand_computed_numbers():
    # per-prompt tau before (5+10)/10, (10+20)/20, (0+10)/10 = 1.5 1.5 1.0; after 2.0 1.5 1.5
    # differences 0.5 0 0.5: mean 1/3, sample sd sqrt(1/12), SE sqrt(1/12)/sqrt(3) = 1/6
    # pooled: before (15+40)/40 = 1.375, after (25+40)/40 = 1.625
    ids = ["p0", "p1", "p2"]
    before = {"prompt_ids": ids, "per_prompt_steps": [10, 20, 10], "per_prompt_accepted": [5, 10, 0]}
    after = {"prompt_ids": ids, "per_prompt_steps": [10, 20, 10], "per_prompt_accepted": [10, 10, 5]}
    p = ss.paired(before, after)
    assert p["mean_prompt_diff"] == pytest.approx(1 / 3)
    assert p["mean_prompt_diff_se"] == pytest.approx(1 / 6)
    assert (p["pooled_before"], p["pooled_after"]) == (pytest.approx(1.375), pytest.approx(1.625))
    assert p["pooled_diff"] == pytest.approx(0.25)
    assert (p["prompts_improved"], p["prompts_worse"], p["steps_before"], p["steps_after"]) == (2, 0, 40, 40)
    assert 0 < p["pooled_diff_se"] < 0.25  # the bootstrap of a difference that every resample keeps >= 0
    same = ss.paired(before, before)
    assert same["pooled_diff"] == 0 and same["pooled_diff_se"] == 0 and same["mean_prompt_diff_se"] == 0
    with pytest.raises(ValueError, match="same prompts"):
        ss.paired(before, {**after, "prompt_ids": ["p0", "p2", "p1"]})
    with pytest.raises(ValueError, match="steps > 0"):
        ss.per_prompt_tau([0, 1], [0, 0])


@pytest.mark.parametrize(
    "diff, se, want",
    [(0.2, 0.05, "positive"), (-0.2, 0.05, "negative"), (0.01, 0.01, "powered null"), (0.05, 0.03, "underpowered")],
)
def test_verdict_rule(diff, se, want):
    # 0.2 > 3 x 0.05; 2.8 x 0.01 = 0.028 <= 0.05 (powered); 2.8 x 0.03 = 0.084 > 0.05 (not)
    assert ss.verdict(diff, se, 0.05) == want


def test_verdict_refuses_a_missing_se():
    with pytest.raises(ValueError, match="finite SE"):
        ss.verdict(0.1, math.nan, 0.05)


def test_metrics_are_read_from_a_replicas_real_series():
    from dopd.serve import ReplicaMetrics

    m = ReplicaMetrics("r0", K=4)
    steps = [SimpleNamespace(accepted=a, new_tokens=[1] * (a + 1)) for a in (0, 2, 1)]
    m.on_step(steps, 4)
    m.policy.labels("r0").set(5)
    got = ss.parse_metrics(m.text().decode())
    # 3 steps, 3 accepted drafts, 6 tokens; window tau (1 + 3 + 2) / 3
    assert got == {"tau_window": 2.0, "policy_version": 5.0, "steps": 3.0, "accepted": 3.0, "tokens": 6.0}


def test_learning_done_reads_the_run_directory(tmp_path):
    assert ss.learning_done(tmp_path, "") is None
    assert ss.learning_done(tmp_path, "dopd serve: learning stopped (RuntimeError: x)") == "failed"
    (tmp_path / "drafter").mkdir()
    (tmp_path / "drafter" / "model.safetensors").write_bytes(b"")
    assert ss.learning_done(tmp_path, "") is None  # summary.json is written after drafter/
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 1}))
    assert ss.learning_done(tmp_path, "") == "finished"


def test_the_command_refuses_a_missing_drafter_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from dopd.experiments.cli import app

    r = CliRunner().invoke(app, ["serve-shift", "--drafter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no drafter there" in r.output, r.output
    r = CliRunner().invoke(app, ["serve-shift", "--drafter", str(tmp_path), "--steps", "0"])
    assert r.exit_code != 0 and "steps=0" in r.output, r.output


def test_the_report_leads_with_the_verdict_and_names_the_machine():
    ids = ["a", "b"]
    ev = {"tau": 1.5, "cli_tau": 1.5, "vocab_coverage": 0.9, "prompt_ids": ids}
    pair = ss.paired(
        {"prompt_ids": ids, "per_prompt_steps": [10, 10], "per_prompt_accepted": [5, 5]},
        {"prompt_ids": ids, "per_prompt_steps": [10, 10], "per_prompt_accepted": [6, 4]},
    )
    r = {
        "verdict": "underpowered", "machine": "Some CPU, 2 cores, CPU only", "torch_threads": 2, "target": "t",
        "dtype": "float32", "drafter": "d", "sizes": ss.asdict(ss.QUICK), "seed": 0, "meaningful": 0.05,
        "traffic_ids": ["x"], "served": [{}], "wall_s": 60.0, "paired": {"humaneval": pair, "champ": pair},
        "before": {"humaneval": ev, "champ": ev}, "after": {"humaneval": ev, "champ": {**ev, "cli_tau": 1.4}},
        "lossless": {"checked": 1, "identical": True},
        "serve": {"epochs": 1, "errors": [], "serve_s": 30.0, "command": ["dopd", "serve"],
                  "summary": {"steps": 4, "policy_version": 2, "records_consumed": 8}},
        "live": [{"t_s": 10.0, "learner_step": 1, "policy_version": 1.0, "tau_window": 1.2, "tau_interval": None}],
    }  # fmt: skip
    md = ss.render(r).splitlines()
    assert md[0].startswith("**Result: underpowered**") and "1.500 -> 1.500" in md[0]
    assert "Some CPU, 2 cores" in md[2]
    text = "\n".join(md)
    assert "after champ 1.4000 (DIFFERS from 1.5000)" in text and "identical text and token counts" in text


def test_live_rows_are_labelled_with_the_traffic_epoch_being_served():
    served = [{"epoch": 0, "finished_at": 10.0, "seconds": 8.0}, {"epoch": 1, "finished_at": 30.0, "seconds": 5.0}]
    # epoch 2 (1-based) starts at 25.0
    assert [ss._epoch_at(served, t) for t in (1.0, 2.0, 24.9, 25.0, None)] == ["", "1", "1", "2", ""]
