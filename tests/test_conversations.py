"""Conversation datasets in every storage format: turns counted, context as the chat template writes it, skips
counted, errors that name the file, line and field; both answer modes through the runners' shared data path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dopd.common.config import SFTConfig
from dopd.common.errors import ConfigError, PromptError
from dopd.common.load import load_config
from dopd.conversations import Limits, conversation_turns, encode_turns, read_conversations
from dopd.prompts import load_examples, run_prompts

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conversations.jsonl"

SHAREGPT = [
    {"id": "math", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."},
        {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6."},
    ]},
    {"id": "weather", "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": "{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}"},
        {"from": "observation", "value": "{\"c\": 3}"},
        {"from": "gpt", "value": "It is 3 degrees."},
    ]},
    {"id": "greeter", "conversations": [{"from": "gpt", "value": "Hello! How can I help?"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi there."}]},
    {"id": "blank", "conversations": [{"from": "human", "value": "Say nothing"}, {"from": "gpt", "value": "  "}]},
    {"id": "open", "conversations": [{"from": "human", "value": "Tell me a joke"}]},
]  # fmt: skip

OPENAI = [
    {"id": "math", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]}, {"role": "assistant", "content": "6."},
    ]},
    {"id": "weather", "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "{\"c\": 3}"},
        {"role": "assistant", "content": "It is 3 degrees."},
    ]},
    {"id": "greeter", "messages": [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi there."}]},
    {"id": "blank", "messages": [{"role": "user", "content": "Say nothing"}, {"role": "assistant", "content": "  "}]},
    {"id": "open", "messages": [{"role": "user", "content": "Tell me a joke"}]},
]  # fmt: skip

# what every file above holds, whatever its format
COUNTS = {
    "conversations": 5, "assistant_turns": 7, "examples": 5, "skipped_tool_call": 1, "tool_messages": 1,
    "skipped_no_user_turn": 1, "skipped_empty_answer": 1, "prompts_without_answer": 1,
}  # fmt: skip
IDS = ["math/1", "math/2", "weather/2", "greeter/2", "open"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(path, **kw) -> list:
    prompts, counts = conversation_turns(read_conversations(path, **kw))
    assert {
        k: v for k, v in counts.items() if not k.startswith("rows_") and k != "conversations_without_examples"
    } == COUNTS
    assert [p.id for p in prompts] == IDS
    return prompts


def test_every_format_gives_the_same_turns(tmp_path):
    """ShareGPT JSONL, OpenAI JSONL, Parquet and a saved Hugging Face dataset (and a DatasetDict's split)."""
    import datasets

    share = _check(_jsonl(tmp_path / "share.jsonl", SHAREGPT))
    openai = _check(_jsonl(tmp_path / "openai.jsonl", OPENAI))
    # tool calls are context as text in the turn after them: only the call's own text differs between the formats
    assert [p.messages for p in share][:2] == [p.messages for p in openai][:2] and share[-1] == openai[-1]
    assert share[2].messages[1] == ("assistant", SHAREGPT[1]["conversations"][1]["value"])
    assert share[2].messages[2] == ("tool", '{"c": 3}') and share[2].answer == "It is 3 degrees."
    assert json.loads(openai[2].messages[1][1])[0]["function"]["name"] == "weather"
    assert share[1].messages == (
        ("system", "Be brief."),
        ("user", "What is 2+2?"),
        ("assistant", "4."),
        ("user", "And 3+3?"),
    )
    assert share[1].answer == "6." and share[-1].answer is None and len({p.group for p in share}) == 4

    pq = tmp_path / "openai.parquet"
    flat = json.loads(json.dumps(OPENAI))
    flat[0]["messages"][3]["content"] = "And 3+3?"  # an Arrow column holds strings or lists, not both
    datasets.Dataset.from_list(flat).to_parquet(str(pq))  # Arrow unifies the schema: missing keys become None
    assert [(p.messages, p.answer) for p in _check(pq)] == [(p.messages, p.answer) for p in openai]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(saved))
    assert _check(saved) == share
    dd = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(SHAREGPT), "test": datasets.Dataset.from_list(SHAREGPT[:1])}
    ).save_to_disk(str(dd))
    assert _check(dd) == share  # "train" by default
    assert len(read_conversations(dd, split="test")) == 1
    with pytest.raises(PromptError, match="splits"):
        read_conversations(dd, split="validation")


def test_context_is_the_chat_template_by_hand(tiny):
    """The second turn of a multi-turn conversation: its context, written out by hand in the template's format,
    tokenizes to exactly the ids the data path feeds the target, and its as_is answer is the turn's text + EOS."""
    tok = tiny.tokenizer
    prompts, _ = conversation_turns(read_conversations_rows(SHAREGPT[:1]))
    enc = encode_turns(tok, prompts, Limits(384, 64, "truncate"), with_answers=True)
    by_hand = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    pid, ids, ans = enc.items[1]
    assert pid == "math/2"
    assert ids == tok(by_hand, add_special_tokens=False)["input_ids"]
    assert tok.decode(ans) == "6.<|im_end|>" and ans[-1] == tok.eos_token_id
    # the first turn: the template's context, and the conversation so far (prompt + answer) as one token sequence
    pid, ids, ans = enc.items[0]
    assert (
        tok.decode(ids + ans)
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>"
    )


def read_conversations_rows(rows, tmp=None):
    """read_conversations over rows written to a temporary JSONL file."""
    import tempfile

    d = Path(tempfile.mkdtemp())
    return read_conversations(_jsonl(d / "rows.jsonl", rows))


def test_malformed_rows_name_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    ok = json.dumps(SHAREGPT[0])
    cases = [
        (ok + "\n{\"conversations\": [\n", r"bad.jsonl:2: not valid JSON"),
        (ok + "\n" + json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "narrator", "value": "y"}]}),
         r"bad.jsonl:2: field 'conversations\[1\].from': unknown role 'narrator'"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), r"bad.jsonl:1: field 'messages\[0\].role': unknown role 'wizard'"),
        (json.dumps({"messages": [{"role": "user"}]}), r"bad.jsonl:1: field 'messages\[0\].content': missing"),
        (json.dumps({"messages": [{"content": "x"}]}), r"bad.jsonl:1: field 'messages\[0\].role': missing"),
        (json.dumps({"conversations": [{"from": "human", "value": 3}]}), r"bad.jsonl:1: field 'conversations\[0\].value': must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), r"field 'messages\[0\].content\[0\]': a 'image_url' part"),
        (json.dumps({"conversations": []}), r"bad.jsonl:1: field 'conversations': must be a non-empty list"),
        (ok + "\n\n7\n", r"bad.jsonl:3: each row must be a JSON object"),
        (json.dumps({"text": "x"}), r"bad.jsonl:1: needs a non-empty 'prompt' string.*fields: text"),
        (ok + "\n" + ok, r"bad.jsonl:2: field 'id': 'math' is used twice \(also at .*bad.jsonl:1\)"),
    ]  # fmt: skip
    for text, msg in cases:
        f.write_text(text)
        with pytest.raises(PromptError, match=msg):
            read_conversations(f)
    import datasets

    pq = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(
        [SHAREGPT[0], {"id": "x", "conversations": [{"from": "alien", "value": "y"}]}]
    ).to_parquet(str(pq))
    with pytest.raises(PromptError, match=r"bad.parquet row 2: field 'conversations\[0\].from': unknown role 'alien'"):
        read_conversations(pq)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(PromptError, match="unsupported file type '.csv'"):
        read_conversations(tmp_path / "data.csv")
    with pytest.raises(PromptError, match="prompt file not found"):
        read_conversations(tmp_path / "nope.jsonl")


def test_length_limits_truncate_or_skip_and_count(tiny):
    tok = tiny.tokenizer
    long_turns = [
        {"from": "human", "value": f"question {i} " + "word " * 30}
        if i % 2 == 0
        else {"from": "gpt", "value": f"answer {i} " + "word " * 30}
        for i in range(6)
    ]
    rows = [
        {
            "id": "long",
            "conversations": [{"from": "system", "value": "SYS"}]
            + long_turns
            + [{"from": "human", "value": "last?"}, {"from": "gpt", "value": "done " * 40}],
        }
    ]
    prompts, _ = conversation_turns(read_conversations_rows(rows))
    full = [
        len(tok.apply_chat_template(p.as_messages(), add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in prompts
    ]
    limit = full[1] + 5  # the first two turns fit, the last two do not
    enc = encode_turns(tok, prompts, Limits(limit, 20, "truncate"), with_answers=True)
    assert (
        len(enc.items) == 4
        and enc.counts["truncated_context"] == 2
        and all(len(ids) <= limit for _, ids, _ in enc.items)
    )
    last = enc.prompts[-1].messages
    assert (
        last[0] == ("system", "SYS") and last[1][0] == "user" and last[-1] == ("user", "last?")
    )  # oldest turns dropped
    assert len(last) < len(prompts[-1].messages)
    assert enc.counts["truncated_answer"] == 4 and all(
        len(a) == 20 for *_, a in enc.items
    )  # every answer is > 20 tokens
    skip = encode_turns(tok, prompts, Limits(limit, 20, "skip"), with_answers=True)
    assert (
        len(skip.items) == 0
        and skip.counts["skipped_context_too_long"] == 2
        and skip.counts["skipped_answer_too_long"] == 2
    )
    regen = encode_turns(tok, prompts, Limits(limit, 20, "skip"), with_answers=False)  # regenerate: answers not encoded
    assert len(regen.items) == 2 and all(len(it) == 2 for it in regen.items)
    tiny_limit = encode_turns(tok, prompts, Limits(10, 20, "truncate"), with_answers=False)
    assert (
        tiny_limit.items == [] and tiny_limit.counts["skipped_context_too_long"] == 4
    )  # even the last turn alone does not fit


def _cfg(*extra):
    return load_config(None, ["model.target=tiny-random-llama", f"data.prompts={EXAMPLE}", "data.num_eval=8", *extra])


def test_held_out_split_is_by_conversation_and_as_is_items_carry_answers(tiny):
    regen = run_prompts(_cfg(), tiny.tokenizer)
    as_is = run_prompts(_cfg("data.answers=as_is"), tiny.tokenizer)
    held = {i.rsplit("/", 1)[0] for i in regen.split["eval_ids"]}
    trained = {it[0].rsplit("/", 1)[0] for it in regen.train}
    assert len(held) == 8 and not held & trained
    ex = load_examples(str(EXAMPLE))
    # every turn of a held-out conversation is held out, none trained
    assert sorted(regen.split["eval_ids"]) == sorted(p.id for p in ex.prompts if p.group in held)
    assert len(regen.eval_ids) == len(regen.split["eval_ids"]) and as_is.eval_ids == regen.eval_ids
    assert all(len(it) == 2 for it in regen.train) and all(len(it) == 3 for it in as_is.train)
    assert [it[:2] for it in as_is.train] == regen.train
    d = as_is.split["data"]
    assert (
        d["answers"] == "as_is" and d["skipped_tool_call"] == 2 and d["tool_messages"] == 2 and d["conversations"] == 38
    )
    assert d["examples"] == len(regen.train) + len(regen.eval_ids)
    assert "38 conversations" in as_is.summary() and "skipped_tool_call 2" in as_is.summary()
    for _pid, _ids, ans in as_is.train:
        assert (
            ans[-1] == tiny.tokenizer.eos_token_id or len(ans) == SFTConfig().max_new_tokens
        )  # end of turn, or cut at the answer limit
    # a separate eval file: every turn of its first num_eval conversations
    ev = run_prompts(_cfg(f"data.eval_prompts={EXAMPLE}", "data.num_eval=2"), tiny.tokenizer)
    first_two = [c["id"] for c in map(json.loads, EXAMPLE.read_text().splitlines()[:2])]
    assert (
        sorted(ev.split["eval_ids"]) == sorted(p.id for p in ex.prompts if p.group in first_two)
        and len(ev.eval_ids) == 3
    )
    with pytest.raises(PromptError, match="no training example has an answer"):
        run_prompts(
            load_config(
                None,
                [
                    "model.target=tiny-random-llama",
                    "data.prompts=champ-problems",
                    "data.num_eval=4",
                    "data.answers=as_is",
                ],
            ),
            tiny.tokenizer,
        )


def test_as_is_refuses_rollouts_that_decode():
    for bad in (["rollout.path=engine"], ["rollout.temperature=1"]):
        with pytest.raises(ConfigError, match="data.answers=as_is teacher-forces"):
            load_config(None, ["data.answers=as_is", *bad])
    load_config(None, ["data.answers=as_is", "mode=sft", "rollout.temperature=1"])  # SFT only: nothing is rolled out


def test_walk_accepts_nothing_past_a_given_answer():
    """Re-segmentation along a dataset's answer: a draft past the answer's end is never accepted, even when it
    equals the padding there (the target's text past the end is unknown without decoding)."""
    from dopd.actors.target_text import GivenText
    from dopd.common.greedy import GreedyText
    from dopd.common.resegment import walk

    pad = 2
    prompt, answer = [5, 6], [7, 8, 9]
    blocks = np.array([[7, 8, 9, pad], [8, 9, pad, pad], [9, pad, pad, pad]])  # the text and its padding, everywhere
    given = walk(GivenText(prompt, answer, [pad] * 16, "eos"), blocks, np.zeros(blocks.shape, np.float32))
    assert given.accepted.tolist() == [3] and given.everywhere.tolist() == [3, 2, 1]
    greedy = walk(GreedyText(prompt, answer, [pad] * 16, "eos"), blocks, np.zeros(blocks.shape, np.float32))
    assert greedy.accepted.tolist() == [4] and greedy.everywhere.tolist() == [
        4,
        4,
        4,
    ]  # the target's own lookahead counts


def test_rollout_worker_uses_given_answers(tiny):
    """The worker every Ray rollout actor wraps (and the in-process runner drives): with as_is items its SFT data
    and its rollout records are the dataset's answers, teacher-forced; with plain items, the target's greedy text."""
    from dopd.actors.actor import RolloutWorker
    from dopd.common.greedy import greedy_texts
    from dopd.common.record import decode_record, decode_teacher

    cfg = _cfg("data.answers=as_is", "rollout.max_new_tokens=16", "sft.max_new_tokens=16", "rollout.batch_size=2")
    p = run_prompts(cfg, tiny.tokenizer)
    items = p.train[:3]
    w = RolloutWorker(cfg, 0, items, incarnation=0, target=tiny)
    w.set_weights(w.drafter.state_dict(), 1)
    teach = [decode_teacher(b) for b in w.teacher_data(items)]
    assert [t.token_ids.tolist() for t in teach] == [ids + ans for _, ids, ans in items]
    data, stats = w.produce(3)
    recs = sorted((decode_record(b) for b in data), key=lambda r: r.prompt_id)
    want = sorted(items)
    assert [r.prompt_id for r in recs] == [i for i, *_ in want] and stats["path"] == "resegment"
    assert [r.token_ids.tolist() for r in recs] == [ids + ans for _, ids, ans in want]
    greedy = greedy_texts(tiny, [ids for _, ids, _ in want], 16)
    assert any(g.answer != ans for g, (_, _, ans) in zip(greedy, want))  # the two modes train on different text
