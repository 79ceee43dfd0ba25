"""`dopd eval` end to end on the tiny target, and its clear errors."""

from __future__ import annotations

import json

from helpers import assert_counts_agree
from typer.testing import CliRunner

from dopd.cli import app
from dopd.experiments.cli import app as experiments_app

runner = CliRunner()


def test_eval_writes_report_and_outputs(tmp_path):
    out, dump = tmp_path / "e.json", tmp_path / "o.jsonl"
    r = runner.invoke(
        app,
        [
            "eval",
            "--target",
            "tiny-random-llama",
            "--drafter",
            "init-dflash",
            "--prompts",
            "champ-problems",
            "--num-prompts",
            "3",
            "--max-new-tokens",
            "12",
            "--block-size",
            "3",
            "--json",
            str(out),
            "--dump-outputs",
            str(dump),
            "--threads",
            "2",
            "--decode",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    for key in (
        "tau",
        "alpha",
        "tokens_per_s",
        "baseline_tokens_per_s",
        "speedup",
        "identical_to_target",
        "num_prompts",
        "num_steps",
        "target",
        "drafter",
        "block_size",
        "temperature",
        "device",
    ):
        assert key in rep, key
    assert rep["identical_to_target"] is True and rep["num_prompts"] == 3 and len(rep["alpha"]) == 3
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert len(lines) == 3 and all({"prompt_ids", "output_ids", "text"} <= set(x) for x in lines)
    assert_counts_agree(rep, lines, 3)  # tau x steps against the tokens written, counted from the outputs
    assert "tau (tokens/step)" in r.output


def test_eval_simulate_has_the_same_keys_and_tau(tmp_path):
    args = ["eval", "--target", "tiny-random-llama", "--drafter", "init-eagle3", "--prompts", "champ-problems", "--num-prompts", "3",
            "--max-new-tokens", "16", "--block-size", "3", "--threads", "2", "--no-baseline"]  # fmt: skip
    plain, sim = tmp_path / "e.json", tmp_path / "s.json"
    r = runner.invoke(app, [*args, "--decode", "--json", str(plain)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--simulate", "--json", str(sim), "--dump-outputs", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    a, b = json.loads(plain.read_text()), json.loads(sim.read_text())
    assert set(a) <= set(b) and b["simulated"] is True and a["simulated"] is False
    assert (b["tau"], b["alpha"], b["num_steps"], b["new_tokens"]) == (
        a["tau"],
        a["alpha"],
        a["num_steps"],
        a["new_tokens"],
    )
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3
    r = runner.invoke(app, [*args, "--simulate", "--temperature", "0.8"])
    assert r.exit_code == 2 and "greedy decoding only" in r.output


def test_eval_errors_are_clear(tmp_path):
    cases = [
        (["--target", "no-such-model"], "unknown model 'no-such-model'"),
        (["--target", "tiny-random-llama", "--block-size", "0"], "--block-size must be >= 1"),
        (["--target", "tiny-random-llama", "--prompts", str(tmp_path / "x.jsonl")], "prompt file not found"),
        (["--target", "tiny-random-llama", "--drafter", "init-medusa"], "unknown drafter 'init-medusa'"),
        (
            ["--target", "tiny-random-llama", "--max-prompt-tokens", "10", "data.too_long=skip"],
            "no held-out prompt fits in 10 tokens",
        ),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    cases.append((["--target", "tiny-random-llama", "--prompts", str(bad)], "needs a non-empty 'prompt'"))
    for args, msg in cases:
        r = runner.invoke(app, ["eval", "--num-prompts", "2", "--max-new-tokens", "4", *args])
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output, (msg, r.output)


def test_train_rejects_unknown_config_key():
    r = runner.invoke(app, ["train", "learner.lrr=1"])
    assert r.exit_code == 2 and "unknown config key 'learner.lrr'" in r.output
    r = runner.invoke(app, ["train", "--actors", "2", "cluster.bogus=1"])
    assert r.exit_code == 2 and "unknown config key 'cluster.bogus'" in r.output


def test_experiment_rejects_bad_arms_and_presets(tmp_path):
    """`dopd-experiments plateau` (its own entry point); the core CLI has no experiment command."""
    r = runner.invoke(app, ["experiment", "plateau", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "No such command 'experiment'" in r.output
    r = runner.invoke(experiments_app, ["plateau", "--out", str(tmp_path), "--preset", "laptop"])
    assert r.exit_code == 2 and "unknown preset 'laptop'" in r.output
    r = runner.invoke(experiments_app, ["plateau", "--out", str(tmp_path), "--arms", "B,magic"])
    assert r.exit_code == 2 and "unknown arms ['magic']" in r.output
    r = runner.invoke(experiments_app, ["plateau", "--out", str(tmp_path), "--seeds", "0"])
    assert r.exit_code == 2 and "--seeds must be >= 1" in r.output
    r = runner.invoke(experiments_app, ["plateau", "--out", str(tmp_path), "--drafter", "medusa"])
    assert r.exit_code == 2 and "unknown drafter 'medusa'" in r.output


def test_loopback_addresses_are_recognised():
    """A driver joining a loopback head must pin itself to 127.0.0.1 (Ray would rewrite it to the eth0 address)."""
    from dopd.connection import is_loopback

    assert is_loopback("127.0.0.1:6379") and is_loopback("localhost:6379") and is_loopback("ray://127.0.0.1:10001")
    assert not is_loopback("10.0.0.5:6379") and not is_loopback("ray://head.svc:10001")
