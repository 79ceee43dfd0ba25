"""The CLI's own conventions (`--version`, `config show`, `config check`), `data inspect`, and `dopd train` on the
committed conversation example in both answer modes."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dopd.cli import app
from dopd.common.config import Config
from dopd.common.load import load_config
from dopd.config_help import field_comments, key_docs

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conversations.jsonl"


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"dopd {version('dopd')}"


def test_every_key_has_a_meaning_from_its_dataclass():
    docs = key_docs()
    assert len(docs) == len({d.key for d in docs}) > 100
    assert [d.key for d in docs if not d.meaning] == []  # a new field needs a comment beside (or above) it
    by_key = {d.key: d for d in docs}
    assert (
        by_key["rollout.block_size"].meaning == "K draft tokens per verification step"
        and by_key["rollout.block_size"].default == 4
    )
    assert by_key["data.answers"].type == "regenerate | as_is" and by_key["learner.betas"].default == [0.9, 0.95]
    assert by_key["replay.anchors"].meaning.startswith(
        '"rollout": the rollout\'s block starts (official [docs/recipes.md R1, R9])'
    )  # the lines above it
    from dopd.common.config import ModelConfig

    assert field_comments(ModelConfig)["target"] == "alias | local HF directory | hub id"


def test_config_show_is_a_config_file(tmp_path):
    r = runner.invoke(app, ["config", "show"])
    assert r.exit_code == 0, r.output
    tree = yaml.safe_load(r.output)
    assert tree["rollout"]["block_size"] == 4 and "drafter" in tree
    f = tmp_path / "all.yaml"
    f.write_text(r.output)
    assert load_config(f) == load_config(None)  # every key, with its (resolved) default: loading it changes nothing
    for d in key_docs():
        assert f"{d.key.rsplit('.', 1)[-1]}: " in r.output
    assert "block_size: 4  # K draft tokens per verification step" in r.output
    assert "answers: regenerate  # [regenerate | as_is]" in r.output
    r = runner.invoke(app, ["config", "show", "-c", str(f), "rollout.block_size=6", "data.answers=as_is"])
    assert r.exit_code == 0 and load_config_text(r.output, tmp_path).rollout.block_size == 6
    r = runner.invoke(app, ["config", "show", "rollout.blok_size=6"])
    assert r.exit_code == 2 and "did you mean 'block_size'" in r.output


def load_config_text(text: str, tmp_path: Path) -> Config:
    f = tmp_path / "shown.yaml"
    f.write_text(text)
    return load_config(f)


def test_config_check(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"data": {"prompts": str(EXAMPLE), "answers": "as_is", "num_eval": 8}, "learner": {"steps": 10}})
    )
    r = runner.invoke(app, ["config", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert (
        r.output.startswith(f"ok: {good}")
        and "38 conversations, 52 examples before length limits" in r.output
        and "data.answers='as_is'" in r.output
    )
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text(
        EXAMPLE.read_text().splitlines()[0]
        + "\n"
        + json.dumps({"conversations": [{"from": "robot", "value": "x"}]})
        + "\n"
    )
    cases = [
        ({"learner": {"stepz": 3}}, "unknown config key 'learner.stepz' (did you mean 'steps'?)"),
        ({"data": {"answers": "as_is"}, "rollout": {"temperature": 1.0}}, "data.answers=as_is teacher-forces"),
        ({"data": {"answers": "maybe"}}, "config key 'data.answers' must be one of ['regenerate', 'as_is']"),
        ({"data": {"prompts": str(bad_lines)}}, f"{bad_lines}:2: field 'conversations[0].from': unknown role 'robot'"),
    ]
    for tree, msg in cases:
        f = tmp_path / "c.yaml"
        f.write_text(yaml.safe_dump(tree))
        r = runner.invoke(app, ["config", "check", str(f)])
        assert r.exit_code == 2 and msg in r.output.replace("\n", ""), (tree, r.output)
    r = runner.invoke(app, ["config", "check", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "config file not found" in r.output


def test_data_inspect(tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "data",
            "inspect",
            str(EXAMPLE),
            "--target",
            "tiny-random-llama",
            "data.num_eval=8",
            "data.answers=as_is",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    c = rep["counts"]
    assert (c["conversations"], c["assistant_turns"], c["skipped_tool_call"], c["tool_messages"]) == (38, 54, 2, 2)
    assert (
        rep["train"]["examples"] + rep["held_out"]["examples"] == c["examples"] == 52 and rep["held_out"]["groups"] == 8
    )
    ex = rep["examples"][0]
    # the context opens the assistant turn, and the teacher-forced answer closes it, unless it was cut at the limit
    assert ex["context"].endswith("<|im_start|>assistant\n"), ex["context"][-40:]
    assert ex["answer"].endswith("<|im_end|>") or ex["answer_tokens"] == rep["answer_tokens"]["limit"], ex
    for line in ("conversations      38  (sharegpt 38)", "skipped            tool_call 2", "answer, teacher-forced"):
        assert line in r.output, line
    r = runner.invoke(app, ["data", "inspect", str(tmp_path / "missing.jsonl"), "--target", "tiny-random-llama"])
    assert r.exit_code == 2 and "prompt file not found" in r.output


def test_train_on_the_example_in_both_answer_modes(tmp_path):
    """`dopd train` on examples/conversations.jsonl, regenerate and as_is (tiny target, tiny budget); the as_is run
    also writes TensorBoard event files whose held-out tau is the one in metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [
        "model.target=tiny-random-llama", f"data.prompts={EXAMPLE}", "data.num_eval=8", "sft.warmup_steps=4", "learner.steps=4",
        "learner.refresh_every=2", "learner.eval_every=4", "rollout.max_new_tokens=16", "sft.max_new_tokens=16", "eval.max_new_tokens=16",
    ]  # fmt: skip
    runs = {}
    for mode in ("regenerate", "as_is"):
        out = tmp_path / mode
        extra = ["metrics.tensorboard=true"] if mode == "as_is" else []
        r = runner.invoke(app, ["train", "--threads", "2", "--out", str(out), f"data.answers={mode}", *common, *extra])
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        split = json.loads((out / "split.json").read_text())
        assert summary["steps"] == 8 and split["data"]["answers"] == mode and split["data"]["skipped_tool_call"] == 2
        assert "38 conversations, 54 assistant turns" in r.output and (out / "drafter").is_dir()
        runs[mode] = (out, split)
    assert runs["regenerate"][1]["eval_ids"] == runs["as_is"][1]["eval_ids"]  # one held-out set for both modes
    # what the OPD rounds rolled out: the dataset's answers (as_is), the target's own text (regenerate)
    from transformers import AutoTokenizer

    from dopd.common.models import resolve_target
    from dopd.prompts import run_prompts

    tok = AutoTokenizer.from_pretrained(resolve_target("tiny-random-llama", quiet=True))
    given = {pid: ids + ans for pid, ids, ans in run_prompts(load_config(runs["as_is"][0] / "config.yaml"), tok).train}
    for mode, (out, _) in runs.items():
        rolled = [json.loads(x) for x in (out / "opd_sequences.jsonl").read_text().splitlines()]
        same = [r["token_ids"] == given[r["prompt_id"]] for r in rolled]
        assert len(rolled) == 8 and (all(same) if mode == "as_is" else not all(same)), mode
    out = runs["as_is"][0]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [(e.step, round(e.value, 5)) for e in ea.Scalars("dopd_heldout_tau")] == [
        (e["step"], round(e["tau"], 5)) for e in evals
    ]
    assert len(ea.Scalars("dopd_learner_loss/stream=total")) == 8
    assert not (runs["regenerate"][0] / "tensorboard").exists()  # off by default
