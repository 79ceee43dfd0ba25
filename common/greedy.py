"""The target's own text, computed once: greedy answers cached on disk, and one teacher-forced prefill over them.

Why: at T = 0 the target's greedy text does not depend on the drafter, so decoding it again every training round
and every held-out evaluation (as the engine does) repeats the most expensive work for nothing. Only WHERE
verification blocks start depends on the drafter (`common/resegment.py`). So each prompt's greedy answer is
generated once per (target weights, dtype, device type, prompt ids, length) and kept in `cache_dir()/greedy/`;
one prefill-style forward over it gives everything a record or an evaluation needs from the target at positions
whose prefix is the target's own text: features of the drafter's layers and the target's top-k.

Exact acceptance at the end of an answer: the engine's last verification step drafts K tokens past the answer's
end (past EOS or max_new_tokens) and counts those that match what the target would have said there, before it
truncates. So the cached text continues `LOOKAHEAD` tokens past max_new_tokens with EOS ignored
(`DecodeSettings.stop_at_eos=False`); the answer is that continuation cut at the first EOS or max_new_tokens, and
what follows it is the lookahead that re-segmentation checks drafts against.

The SFT warm-up data (teacher-forced target-written answers) is the same computation: `teacher_data` serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RecordError
from .models import Target
from .progress import Progress
from .pypi import cache_dir
from .record import SCHEMA_VERSION, TeacherRecord, decode_teacher, encode_teacher
from .specdec import DecodeSettings, SeqResult, SpecEngine

LOOKAHEAD = 16  # tokens cached past max_new_tokens: exact acceptance at the answer's end for any K <= 17


@dataclass
class GreedyText:
    """A prompt, the target's greedy answer to it, and the target's greedy continuation past the answer's end."""

    prompt_ids: list[int]
    answer: list[int]  # up to and including the first EOS, at most max_new_tokens
    lookahead: list[int]  # what greedy decoding says after the answer (EOS ignored), LOOKAHEAD tokens or more
    finish: str  # "eos" | "length"
    # set when this call decoded the text with `capture`: its features and top-k rows, the teacher data for free
    decoded: SeqResult | None = None

    @property
    def tokens(self) -> list[int]:
        """prompt + answer + lookahead: the text the drafter's proposals are checked against."""
        return self.prompt_ids + self.answer + self.lookahead

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def end(self) -> int:
        """Length of prompt + answer (the committed sequence)."""
        return len(self.prompt_ids) + len(self.answer)

    @property
    def known_len(self) -> int:
        """How much of `tokens` is known target text (all of it here; a dataset's answer has no lookahead)."""
        return len(self.prompt_ids) + len(self.answer) + len(self.lookahead)


def _key(target: Target, prompt: list[int], total: int) -> str:
    ident = {
        "weights": target.fingerprint, "name": target.info.to_dict(), "dtype": str(target.dtype),
        "device": target.device.type, "prompt": list(map(int, prompt)), "new_tokens": total,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _split(prompt: list[int], cont: list[int], max_new_tokens: int, eos: set[int]) -> GreedyText:
    end = max_new_tokens
    finish = "length"
    for i, t in enumerate(cont[:max_new_tokens]):
        if t in eos:
            end, finish = i + 1, "eos"
            break
    return GreedyText(list(prompt), list(cont[:end]), list(cont[end:]), finish)


# rows decoded together when the target writes text alone: a decode step costs little more at 64 rows than at 1
# (bench/engine_throughput.py)
# part of every teacher-data cache key: raised when the rows a cached entry holds were computed wrongly, so that no
# run trains on them again (2: decode-time top-k rows of a prompt that left its batch slot were overwritten)
ROWS_REVISION = 2
TEXT_BATCH = 64
PREFILL_BATCH = 8  # sequences per teacher-forced forward


def greedy_texts(
    target: Target,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    log=None,
    capture: tuple | None = None,
) -> list[GreedyText]:
    """The target's greedy answer (+ lookahead) to every prompt, decoded only for prompts not cached yet.

    `capture=(feature_layers, topk[, hidden])`: texts decoded by this call also keep the features of those layers and
    the target's top-k (and with `hidden` its final normed hidden state) at every answer-predicting position
    (`GreedyText.decoded`): a teacher-forced prefill computes the same rows, so `teacher_data` need not read the
    text again. Decoding that takes longer than ~10 s reports
    progress (tokens, rate, ETA) through `log` (default stderr)."""
    total = max_new_tokens + LOOKAHEAD
    root = cache_dir() / "greedy"
    paths = [root / f"{_key(target, p, total)}.json" for p in prompts]
    conts: list[list[int] | None] = []
    V = target.info.vocab_size
    for path in paths:
        try:
            c = json.loads(path.read_text())["continuation"]
        except (OSError, ValueError, KeyError, TypeError):
            c = None
        # a damaged or foreign entry is decoded again, never used: it would become training data
        ok = isinstance(c, list) and 0 < len(c) <= total and all(type(t) is int and 0 <= t < V for t in c)
        conts.append(c if ok else None)
    # similar lengths decode together: a wave's rows then attend over about their own context, and pad less
    missing = sorted((i for i, c in enumerate(conts) if c is None), key=lambda i: len(prompts[i]))
    B = batch_size or TEXT_BATCH
    settings = DecodeSettings(
        block_size=0, temperature=0.0, max_new_tokens=total, batch_size=B, stop_at_eos=False, keep_features=capture is not None,
        feature_layers=capture[0] if capture else None, keep_topk=capture is not None, topk=capture[1] if capture else 16,
        keep_hidden=bool(capture and len(capture) > 2 and capture[2]),
    )  # fmt: skip
    decoded: dict[int, SeqResult] = {}
    chunk = 4 * B  # written to disk chunk by chunk: an interrupted run keeps what it decoded
    with Progress(f"target writing {len(missing)} answers", len(missing) * total, "tok", log) as prog:
        for c in range(0, len(missing), chunk):
            part = missing[c : c + chunk]
            results, _ = SpecEngine(target, None).generate(
                [prompts[i] for i in part], settings, progress=lambda _s, n: prog.update(n)
            )
            root.mkdir(parents=True, exist_ok=True)
            for i, r in zip(part, results):
                conts[i] = r.output_ids
                if capture:
                    decoded[i] = r
                tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"continuation": r.output_ids}))
                tmp.replace(paths[i])  # atomic: concurrent actors may write the same prompt, never a torn file
    eos = set(target.eos_token_ids)
    texts = [_split(p, c, max_new_tokens, eos) for p, c in zip(prompts, conts)]
    for i, r in decoded.items():
        texts[i].decoded = r
    return texts


def _teacher_from_decode(pid: str, g: GreedyText, with_lookahead: bool, fdt: torch.dtype) -> TeacherRecord:
    """The teacher record of a text from its own decoding: the rows a prefill would give at every position that
    predicts an answer (or lookahead) token. Prompt rows predict prompt tokens, which nothing trains on: they carry
    no distribution (all mass in the tail)."""
    r = g.decoded
    toks = g.tokens if with_lookahead else g.prompt_ids + g.answer
    n, P = len(toks), g.prompt_len
    k = r.topk_ids.shape[1]
    ids = np.zeros((n - 1, k), dtype=np.int32)
    probs = np.zeros((n - 1, k), dtype=np.float32)
    ids[P - 1 :] = r.topk_ids[: n - P]
    probs[P - 1 :] = r.topk_probs[: n - P]
    return TeacherRecord(
        prompt_id=pid, token_ids=np.asarray(toks, dtype=np.int32), prompt_len=P, features=r.features[: n - 1].to(fdt),
        topk_ids=ids, topk_probs=probs, tail=np.clip(1 - probs.sum(-1), 0, None).astype(np.float32),
        hidden=None if r.hidden is None else r.hidden[: n - P].to(torch.bfloat16),
    )  # fmt: skip


@torch.no_grad()
def prefill(
    target: Target,
    feature_layers: list[int],
    items: list[tuple[str, list[int], int]],
    topk: int,
    batch_size: int | None = None,
    feature_dtype: torch.dtype | None = None,
    log=None,
    hidden: bool = False,
) -> list[TeacherRecord]:
    """One teacher-forced forward per batch over (id, token_ids, prompt_len) sequences: at every position t the
    drafter's input features f_t and the target's top-k (+ tail mass) for token t+1 given x_0..x_t; with `hidden`
    also the final normed hidden state at the answer-predicting rows (bf16)."""
    dev = target.device
    fdt = feature_dtype or target.dtype
    B = batch_size or PREFILL_BATCH
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))  # similar lengths together: less padding
    done: dict[int, TeacherRecord] = {}
    with Progress(f"target reading {len(items)} texts", sum(len(t) for _, t, _ in items), "tok", log) as prog:
        for c in range(0, len(order), B):
            idx = order[c : c + B]
            chunk = [items[i] for i in idx]
            S = max(len(t) for _, t, _ in chunk)
            ids = torch.zeros(len(chunk), S, dtype=torch.long, device=dev)
            for i, (_, t, _) in enumerate(chunk):
                ids[i, : len(t)] = torch.tensor(t, device=dev)
            # right padding under a causal mask: the padding never reaches a real position
            o = target.forward(
                ids, torch.arange(S, device=dev).expand(len(chunk), S), None, None, S, feature_layers, causal=True
            )
            for j, (i, (pid, t, plen)) in enumerate(zip(idx, chunk)):
                n = len(t)
                lsm = torch.log_softmax(o.logits[j, : n - 1].float(), dim=-1)
                tk = lsm.topk(topk, dim=-1)
                p = tk.values.exp()
                done[i] = TeacherRecord(
                    prompt_id=pid,
                    token_ids=np.asarray(t, dtype=np.int32),
                    prompt_len=plen,
                    features=o.features[j, : n - 1].to(fdt).cpu(),
                    topk_ids=tk.indices.cpu().numpy().astype(np.int32),
                    topk_probs=p.cpu().numpy(),
                    tail=(1 - p.sum(-1)).clamp_min(0).cpu().numpy(),
                    hidden=o.last_hidden[j, plen - 1 : n - 1].to(torch.bfloat16).cpu() if hidden else None,
                )
            prog.update(sum(len(t) for _, t, _ in chunk))
    return [done[i] for i in range(len(items))]


def _prefill_path(
    target: Target,
    p: list[int],
    max_new_tokens: int,
    feature_layers: list[int],
    topk: int,
    feature_dtype: torch.dtype,
    lookahead: bool,
    hidden: bool,
) -> Path:
    """The prefill cache entry of prompt `p`: keyed by its text's own cache key plus everything the rows depend on."""
    ident = [
        _key(target, p, max_new_tokens + LOOKAHEAD), max_new_tokens, feature_layers, topk, str(feature_dtype),
        lookahead, SCHEMA_VERSION, ROWS_REVISION,
    ] + (["hidden"] if hidden else [])  # fmt: skip
    return cache_dir() / "prefill" / (hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24] + ".msgpack")


def _cached_teacher(path: Path, target: Target, pid: str, hidden: bool) -> TeacherRecord | None:
    """The cached rows at `path`, or None when the entry is missing, unreadable or lacks the hidden state asked for
    (then they are recomputed)."""
    try:
        rec = decode_teacher(path.read_bytes(), vocab_size=target.info.vocab_size, hidden_size=target.info.hidden_size)
    except (OSError, RecordError):
        return None
    if hidden and rec.hidden is None:
        return None
    rec.prompt_id = pid
    return rec


def _write_atomic(path: Path, rec: TeacherRecord) -> None:
    """Write through a per-process temporary file and rename: a concurrent reader sees the old entry or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(encode_teacher(rec))
    tmp.replace(path)


def teacher_data(
    target: Target,
    feature_layers: list[int],
    prompts: list[tuple[str, list[int]]],
    max_new_tokens: int,
    topk: int,
    batch_size: int | None = None,
    feature_dtype: torch.dtype = torch.bfloat16,
    with_lookahead: bool = False,
    log=None,
    hidden: bool = False,
) -> tuple[list[GreedyText], list[TeacherRecord]]:
    """Greedy texts and their prefill for (id, prompt ids) pairs, both cached on disk (`hidden`: the records also
    carry the target's final hidden state at the answer-predicting rows; a separate cache entry).

    The prefill cache is keyed by the texts' own cache keys plus the feature layers, top-k and feature dtype, so a
    prompt revisited in a later epoch, by another actor or by another run on the same target costs no target work.
    `with_lookahead` prefills prompt + answer + lookahead (what re-segmentation drafts against); otherwise prompt +
    answer (SFT data).
    """
    t0 = time.perf_counter()
    texts = greedy_texts(
        target, [p for _, p in prompts], max_new_tokens, batch_size, log=log, capture=(feature_layers, topk, hidden)
    )
    t1 = time.perf_counter()

    def path_of(p: list[int], lookahead: bool) -> Path:
        return _prefill_path(target, p, max_new_tokens, feature_layers, topk, feature_dtype, lookahead, hidden)

    paths = [path_of(p, with_lookahead) for _, p in prompts]
    recs = [_cached_teacher(path, target, pid, hidden) for path, (pid, _) in zip(paths, prompts)]
    missing = [i for i, r in enumerate(recs) if r is None]
    for i in missing:  # decoded just now: the decoding already computed the rows
        if texts[i].decoded is not None:
            recs[i] = _teacher_from_decode(prompts[i][0], texts[i], with_lookahead, feature_dtype)
    to_read = [i for i in missing if recs[i] is None]
    if to_read:
        items = []
        for i in to_read:
            g = texts[i]
            toks = g.tokens if with_lookahead else g.prompt_ids + g.answer
            items.append((prompts[i][0], toks, g.prompt_len))
        for i, rec in zip(
            to_read, prefill(target, feature_layers, items, topk, feature_dtype=feature_dtype, log=log, hidden=hidden)
        ):
            recs[i] = rec
    if missing:
        writes = [(paths[i], recs[i]) for i in missing]
        # a decoded text gives the other variant for free: SFT data (no lookahead) now, rollouts (lookahead) later
        writes += [
            (path_of(prompts[i][1], not with_lookahead), _teacher_from_decode(prompts[i][0], texts[i], not with_lookahead, feature_dtype))
            for i in missing if texts[i].decoded is not None
        ]  # fmt: skip
        for path, rec in writes:
            _write_atomic(path, rec)
    if log is not None and missing:
        log(
            f"target text: {len(missing)} of {len(prompts)} prompts new ({t1 - t0:.0f}s decoding, {time.perf_counter() - t1:.0f}s "
            f"prefill of {len(to_read)} texts decoded earlier)"
        )
    return texts, recs  # type: ignore[return-value]
