"""Prompt sets, JSONL parsing errors, and group-wise deterministic splits."""

from __future__ import annotations

import json

import pytest

from dopd.common.errors import PromptError
from dopd.prompts import encode_all, load_prompt_set, split_prompts


def test_builtin_sets_load_and_split_by_group():
    he = load_prompt_set("humaneval")
    assert len(he) == 164 and "def " in he[0].messages[0][1]
    champ = load_prompt_set("champ")
    problems = [p for p in champ if p.canonical]
    assert len(problems) == 270 and len(champ) > 5000  # statements + distinct transcript user turns
    sp = split_prompts(champ, 16, seed=0, source="champ")
    held = {p.group for p in sp.eval}
    assert len(sp.eval) == 16 and all(p.canonical for p in sp.eval)
    assert not held & {p.group for p in sp.train}  # no held-out problem leaks through its transcripts
    again = split_prompts(champ, 16, seed=0, source="champ")
    assert [p.id for p in again.eval] == [p.id for p in sp.eval]
    assert [p.id for p in split_prompts(champ, 16, seed=1).eval] != [p.id for p in sp.eval]
    bigger = split_prompts(champ, 32, seed=0)
    assert {p.id for p in sp.eval} <= {p.id for p in bigger.eval}  # growing the held-out set keeps the old one


def test_jsonl_formats_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "hi"})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "yo"}], "id": "x", "group": "g"})
        + "\n"
    )
    ps = load_prompt_set(str(f))
    assert [p.messages for p in ps] == [(("user", "hi"),), (("user", "yo"),)] and ps[1].id == "x"
    bad = tmp_path / "bad.jsonl"
    for content, msg in [
        ("{not json\n", "p.jsonl:1|bad.jsonl:1: not valid JSON"),
        ('{"text": "x"}\n', "needs a non-empty"),
        ("[1]\n", "JSON object"),
        ('{"messages": [{"role": "user"}]}\n', "role' and 'content"),
    ]:
        bad.write_text(content)
        with pytest.raises(PromptError, match=msg.split("|")[-1]):
            load_prompt_set(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptError, match="empty"):
        load_prompt_set(str(empty))
    with pytest.raises(PromptError, match="not found"):
        load_prompt_set(str(tmp_path / "none.jsonl"))
    with pytest.raises(PromptError, match="unknown prompt set"):
        load_prompt_set("nope")


def test_too_long_prompts(tiny):
    ps = load_prompt_set("champ-problems")[:5]
    with pytest.raises(PromptError, match="tokens, more than the limit"):
        encode_all(tiny.tokenizer, ps, 20, drop_long=False)
    with pytest.raises(PromptError, match="no prompt fits"):
        encode_all(tiny.tokenizer, ps, 20, drop_long=True)
    ids, kept = encode_all(tiny.tokenizer, ps, 4000, drop_long=True)
    assert len(ids) == 5 and ids[0][-3:] == tiny.tokenizer.encode("<|im_start|>assistant\n")[-3:]


def test_run_prompts_rollout_after_sft(tiny):
    """`data.rollout_prompts=after_sft`: OPD rounds roll out only prompts the warm-up did not answer; the
    `data.num_train` cap counts prompts that fit (too-long ones are dropped first)."""
    from dopd.common.load import load_config
    from dopd.prompts import run_prompts

    base = [
        "model.target=tiny-random-llama",
        "data.prompts=champ-problems",
        "data.num_eval=4",
        "sft.num_prompts=10",
        "data.max_prompt_tokens=1000",
    ]
    every = run_prompts(load_config(None, base), tiny.tokenizer)
    assert every.rollout == every.train and every.sft == every.train[:10]
    p = run_prompts(load_config(None, base + ["data.rollout_prompts=after_sft", "data.num_train=16"]), tiny.tokenizer)
    assert len(p.train) == 16 and p.sft == p.train[:10] and p.rollout == p.train[10:]
    assert all(len(ids) <= 1000 for _, ids in p.train) and p.split["num_rollout"] == 6
    assert not {i for i, _ in p.rollout} & {i for i, _ in p.sft}
    with pytest.raises(PromptError, match="rollout_prompts=after_sft"):
        run_prompts(load_config(None, base + ["data.rollout_prompts=after_sft", "data.num_train=10"]), tiny.tokenizer)
