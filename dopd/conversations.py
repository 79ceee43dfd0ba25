"""Conversation datasets: every assistant turn is a training example, with the conversation before it as context.

Why every assistant turn: a drafter is deployed on multi-turn chats, so it must learn the target's answers given
the whole conversation so far. speculators does the same (checked against speculators 0.9.0 from PyPI,
`speculators/data_generation/preprocessing.py`: one training row per assistant turn, its context rendered with
the generation prompt, the answer where the render of the conversation up to that turn extends it: the boundary
`answer_ids` takes). Sending a finished conversation through the template as ONE prompt (what a prompt-only
reader does) would train on none of its answers and ask the target to reply to a conversation that already ended.

Rows (the format is detected per row, so a file may mix them):
- ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": "..."}], "system"?: "..."}
- OpenAI: {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..." | [{"type": "text",
  "text": "..."}], "tool_calls"?: [...]}]}
- plain prompts: {"prompt": "...", "completion" | "response"?: "...", "system"?: "..."}
Optional "id" (default: file stem / line) and "group" (default: the id). The held-out split takes whole groups,
so every turn of a held-out conversation is held out and none of its turns is trained on.

Storage: JSONL (or a JSON list), read line by line here so that an error names its line; Parquet, Arrow and a
Hugging Face dataset saved with `save_to_disk`, read with the `datasets` library (an error names the row).

Tool use: an assistant message that calls a tool (OpenAI `tool_calls`, ShareGPT `function_call`) is not trained
(skipped, counted); tool results (role tool / function / ipython, ShareGPT `observation`) are context only
(counted). Later turns keep both in their context as plain text (a call without text content is its JSON), so
the answer after a tool result is conditioned on it.

Length limits (`data.too_long`): a context longer than `data.max_prompt_tokens` is truncated by dropping its
oldest turns (the system prompt stays; the kept part starts at a user turn) or skipped; a given answer longer
than the answer limit is cut there (its text then ends without end-of-turn, like a regenerated answer that hit
max_new_tokens) or skipped. Every skip and truncation is counted by reason and reported (`dopd data inspect`, the
run's split.json), never silent.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dopd.common.errors import PromptError


# role names as datasets spell them -> the chat template's role
@dataclass(frozen=True)
class Prompt:
    id: str
    group: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    canonical: bool = True  # the group's main statement (held-out prompts are canonical ones)
    answer: str | None = None  # the dataset's own answer to this context (data.answers=as_is teacher-forces it)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of the prompt with the chat template and the assistant turn opened."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            prompt.as_messages(), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return list(tokenizer(prompt.messages[-1][1])["input_ids"])


ROLES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool",
    "function_call": "assistant",  # ShareGPT (LLaMA-Factory): an assistant message that calls a tool
}  # fmt: skip
ANSWER_KEYS = ("completion", "response")  # plain prompt rows: the optional given answer
SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".arrow")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_call: bool = False  # an assistant message that calls a tool (not trained)


@dataclass
class Conversation:
    id: str
    group: str
    messages: list[Message]
    where: str  # "file:line" (or "file row N"), for messages about it
    format: str = ""  # sharegpt | openai | prompt


# ---------------------------------------------------------------------------------------------------------------
# reading rows


def _rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a JSONL / JSON / Parquet / Arrow file or a saved Hugging Face dataset."""
    if path.is_dir():
        yield from _hf_rows(path, split)
        return
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        yield from _hf_rows(path, split)
        return
    text = path.read_text()
    if text.lstrip().startswith("["):  # a JSON list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows, 1):
            yield f"{path} item {i}", row
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


def _hf_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix.lower() == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        else:
            ds = datasets.Dataset.from_file(str(path), in_memory=True)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise PromptError(f"{path}: cannot be read as a dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        name = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if name not in ds:
            raise PromptError(f"{path}: a dataset with splits {names}: choose one with data.hf_split (or --split)")
        ds = ds[name]
    elif split is not None and split != ds.split and str(ds.split or "") != split:
        raise PromptError(f"{path}: a single dataset (split {ds.split}), not a dict with a split '{split}'")
    for i, row in enumerate(ds, 1):
        yield f"{path} row {i}", row


def _text(value: Any, where: str, fld: str) -> str:
    """A message's text: a string, or a list of text parts (OpenAI's content parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, p in enumerate(value):
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise PromptError(f"{where}: field '{fld}[{j}]': a {kind!r} part; only text parts can be trained on")
        return "".join(parts)
    raise PromptError(f"{where}: field '{fld}': must be a string (got {type(value).__name__})")


def _role(value: Any, where: str, fld: str) -> str:
    if not isinstance(value, str) or value.lower() not in ROLES:
        known = ", ".join(sorted(ROLES))
        raise PromptError(f"{where}: field '{fld}': unknown role {value!r} (known: {known})")
    return value.lower()


def _messages(row: dict, where: str) -> list[Message]:
    if "conversations" in row and row["conversations"] is not None:  # ShareGPT
        key, role_f, text_f = "conversations", "from", "value"
    elif "messages" in row and row["messages"] is not None:  # OpenAI
        key, role_f, text_f = "messages", "role", "content"
    else:
        return _prompt_row(row, where)
    items = row[key]
    if not isinstance(items, list) or not items:
        raise PromptError(f"{where}: field '{key}': must be a non-empty list of messages")
    out = []
    system = row.get("system")
    if system is not None:
        out.append(Message("system", _text(system, where, "system")))
    for j, m in enumerate(items):
        fld = f"{key}[{j}]"
        if not isinstance(m, dict):
            raise PromptError(f"{where}: field '{fld}': each message must be an object with '{role_f}' and '{text_f}'")
        # ShareGPT rows written with OpenAI keys (and the reverse) are common; accept either spelling
        rf = role_f if m.get(role_f) is not None else ("role" if role_f == "from" else "from")
        tf = text_f if text_f in m else ("content" if text_f == "value" else "value")
        if m.get(rf) is None:
            raise PromptError(
                f"{where}: field '{fld}.{role_f}': missing (each message needs '{role_f}' and '{text_f}')"
            )
        raw_role = _role(m[rf], where, f"{fld}.{rf}")
        calls = m.get("tool_calls") or m.get("function_call")
        if raw_role == "function_call":
            out.append(Message("assistant", _text(m.get(tf), where, f"{fld}.{tf}"), tool_call=True))
            continue
        if calls and ROLES[raw_role] == "assistant":
            content = m.get(tf)
            text = (
                _text(content, where, f"{fld}.{tf}")
                if content not in (None, "")
                else json.dumps(calls, ensure_ascii=False, default=str)
            )
            out.append(Message("assistant", text, tool_call=True))
            continue
        if tf not in m or m[tf] is None:
            raise PromptError(
                f"{where}: field '{fld}.{text_f}': missing (each message needs '{role_f}' and '{text_f}')"
            )
        out.append(Message(ROLES[raw_role], _text(m[tf], where, f"{fld}.{tf}")))
    return out


def _prompt_row(row: dict, where: str) -> list[Message]:
    p = row.get("prompt")
    if not isinstance(p, str) or not p:
        raise PromptError(
            f"{where}: needs a non-empty 'prompt' string, a 'messages' list (OpenAI) or a 'conversations' list (ShareGPT)"
            + (
                f" (field 'prompt' is {type(p).__name__})"
                if "prompt" in row
                else f" (fields: {', '.join(map(str, row)) or 'none'})"
            )
        )
    out = []
    if row.get("system") is not None:
        out.append(Message("system", _text(row["system"], where, "system")))
    out.append(Message("user", p))
    for k in ANSWER_KEYS:
        if row.get(k) is not None:
            out.append(Message("assistant", _text(row[k], where, k)))
            break
    return out


def read_conversations(path: str | Path, split: str | None = None) -> list[Conversation]:
    """Every conversation of a file or saved dataset; a malformed row is an error naming the file, row and field."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"prompt file not found: {path}")
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise PromptError(
            f"{path}: unsupported file type '{path.suffix}' (JSONL, JSON, Parquet, Arrow, or a directory written by datasets' save_to_disk)"
        )
    out = []
    seen: dict[str, str] = {}
    for n, (where, row) in enumerate(_rows(path, split), 1):
        if not isinstance(row, dict):
            raise PromptError(
                f"{where}: each row must be a JSON object with 'conversations', 'messages' or 'prompt' (got {type(row).__name__})"
            )
        cid = str(row["id"]) if row.get("id") is not None else f"{path.stem}/{n}"
        if cid in seen:
            raise PromptError(
                f"{where}: field 'id': {cid!r} is used twice (also at {seen[cid]}); ids name examples and checkpoints"
            )
        seen[cid] = where
        group = str(row["group"]) if row.get("group") is not None else cid
        fmt = (
            "sharegpt"
            if row.get("conversations") is not None
            else "openai"
            if row.get("messages") is not None
            else "prompt"
        )
        out.append(Conversation(cid, group, _messages(row, where), where, fmt))
    return out


# ---------------------------------------------------------------------------------------------------------------
# turns


def conversation_turns(convs: list[Conversation]) -> tuple[list[Prompt], Counter]:
    """One example per trainable assistant turn (its context, its text as `answer`), and one prompt (no answer)
    per conversation that ends waiting for an answer; counts of what was skipped and why."""
    turns: list[Prompt] = []
    c: Counter = Counter()
    for conv in convs:
        c["conversations"] += 1
        c[f"rows_{conv.format}"] += 1
        msgs = conv.messages
        k = 0
        before = len(turns)
        for i, m in enumerate(msgs):
            if m.role == "tool":
                c["tool_messages"] += 1
                continue
            if m.role != "assistant":
                continue
            c["assistant_turns"] += 1
            k += 1
            context = tuple((x.role, x.content) for x in msgs[:i])
            if m.tool_call:
                c["skipped_tool_call"] += 1
            elif not m.content.strip():
                c["skipped_empty_answer"] += 1
            elif not any(r == "user" for r, _ in context):
                c["skipped_no_user_turn"] += 1
            else:
                turns.append(Prompt(f"{conv.id}/{k}", conv.group, context, answer=m.content))
        if msgs and msgs[-1].role in ("user", "tool"):  # the conversation waits for an answer: a prompt
            c["prompts_without_answer"] += 1
            pid = conv.id if k == 0 else f"{conv.id}/{k + 1}"  # a plain prompt row keeps its own id
            turns.append(Prompt(pid, conv.group, tuple((x.role, x.content) for x in msgs)))
        if len(turns) == before:
            c["conversations_without_examples"] += 1
    c["examples"] = len(turns)
    return turns, c


# ---------------------------------------------------------------------------------------------------------------
# encoding through the target's chat template


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_answer_tokens: int
    too_long: str  # "truncate" | "skip"


def _template(tokenizer, messages, generation: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=generation,
            tokenize=True,
            return_dict=False,
        )
    )


def encode_context(tokenizer, messages: tuple[tuple[str, str], ...]) -> list[int]:
    """The context with the assistant turn opened: `prompts.encode`, the one rendering every prompt gets."""
    return encode(tokenizer, Prompt("", "", messages))


def fit_context(
    tokenizer, messages: tuple[tuple[str, str], ...], limit: int, too_long: str
) -> tuple[tuple[tuple[str, str], ...], list[int], bool] | None:
    """(messages kept, their ids, truncated?) within `limit` tokens, or None when the turn must be skipped.

    Truncation drops the oldest turns, one message at a time, keeps a leading system prompt, and lets the kept
    part start only at a user message (a context opening with an assistant or tool message is not a chat)."""
    ids = encode_context(tokenizer, messages)
    if len(ids) <= limit:
        return messages, ids, False
    if too_long == "skip":
        return None
    head = messages[:1] if messages[0][0] == "system" else ()
    rest = messages[len(head) :]
    while len(rest) > 1:
        rest = rest[1:]
        while len(rest) > 1 and rest[0][0] != "user":
            rest = rest[1:]
        kept = head + rest
        ids = encode_context(tokenizer, kept)
        if len(ids) <= limit:
            return kept, ids, True
    return None


def answer_ids(tokenizer, context: tuple[tuple[str, str], ...], context_ids: list[int], answer: str) -> list[int]:
    """The answer's tokens as the chat template writes the turn, up to and including its end-of-turn token.

    Taken from the template's rendering of context + answer, so the tokens are exactly those of the finished
    conversation; where the template's tokens do not extend the context's (a merge across the boundary), the
    answer's own text is tokenized after the context's text instead."""
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        full = _template(tokenizer, context + (("assistant", answer),), False)
        if full[: len(context_ids)] == context_ids:
            ans = full[len(context_ids) :]
        else:
            msgs = [{"role": r, "content": c} for r, c in context]
            ctx_text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            full_text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
            if not full_text.startswith(ctx_text):
                raise PromptError(
                    "the chat template does not write the answer after its context (it rewrites earlier turns): as_is cannot teacher-force it; use data.answers=regenerate"
                )
            ans = list(tokenizer(full_text[len(ctx_text) :], add_special_tokens=False)["input_ids"])
    else:
        ans = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
    if eos is not None and eos in ans:
        ans = ans[: ans.index(eos) + 1]  # what follows end-of-turn (a newline) is the next turn's, not the answer's
    return ans


@dataclass
class Encoded:
    """Encoded examples of one side of the split: items are (id, prompt ids) or (id, prompt ids, answer ids)."""

    items: list[tuple]
    prompts: list[Prompt]  # the examples kept, with the (possibly truncated) context they were encoded with
    counts: Counter = field(default_factory=Counter)
    prompt_lens: list[int] = field(default_factory=list)
    answer_lens: list[int] = field(default_factory=list)


def encode_turns(tokenizer, turns: list[Prompt], limits: Limits, with_answers: bool) -> Encoded:
    """Encode turns under the length limits; `with_answers` (data.answers=as_is) also encodes the given answer and
    skips turns that have none."""
    enc = Encoded([], [])
    c = enc.counts
    for t in turns:
        if with_answers and t.answer is None:
            c["skipped_no_answer"] += 1
            continue
        fit = fit_context(tokenizer, t.messages, limits.max_prompt_tokens, limits.too_long)
        if fit is None:
            c["skipped_context_too_long"] += 1
            continue
        msgs, ids, truncated = fit
        ans = None
        if with_answers:
            ans = answer_ids(tokenizer, msgs, ids, t.answer)
            if len(ans) > limits.max_answer_tokens:
                if limits.too_long == "skip":
                    c["skipped_answer_too_long"] += 1
                    continue
                ans = ans[: limits.max_answer_tokens]
                c["truncated_answer"] += 1
            enc.answer_lens.append(len(ans))
        if truncated:
            c["truncated_context"] += 1
        enc.items.append((t.id, ids) if ans is None else (t.id, ids, ans))
        enc.prompts.append(replace(t, messages=msgs))
        enc.prompt_lens.append(len(ids))
    return enc


def length_summary(lens: list[int]) -> dict:
    if not lens:
        return {"n": 0}
    return {
        "n": len(lens),
        "min": min(lens),
        "median": statistics.median(lens),
        "mean": round(statistics.fmean(lens), 1),
        "max": max(lens),
        "total": sum(lens),
    }
