"""The text an example is trained on: the target's own greedy answer (regenerate) or the dataset's (as_is).

`data.answers=regenerate`: items are (id, prompt ids); the target's greedy answer is decoded once and cached
(`common/greedy.py`), then prefilled. `data.answers=as_is`: items are (id, prompt ids, answer ids); the dataset's
answer stands in for the target's text, and one prefill over prompt + answer gives the features and the target's
top-k at every position: no decoding at all (a prefill processes a whole answer in one forward, decoding one
token per forward).

What as_is means downstream: the SFT warm-up distils the target's real distribution at every position of the
given answer; an OPD round re-segments the given answer with the current drafter as greedy verification would
if the target had written it (a draft is accepted iff it equals the answer's token), and its records carry the
target's real distributions along that text. Past the answer's end nothing is known without decoding, so the
walk accepts no draft there (`GivenText.known_len`), and the padding that fills the lookahead (end-of-turn
tokens, only so every block has K positions) is never counted as accepted text. Held-out tau is measured on the
target's own greedy answers in both modes (`ExperienceMaker.evaluate`), so the modes are compared on one
measurement: how well the drafter predicts the target at inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from dopd.common.errors import RecordError
from dopd.common.greedy import LOOKAHEAD, GreedyText, prefill, teacher_data
from dopd.common.models import Target
from dopd.common.pypi import cache_dir
from dopd.common.record import TeacherRecord, decode_teacher, encode_teacher


class GivenText(GreedyText):
    """A dataset's answer in the place of the target's greedy text; its lookahead is padding, not text."""

    @property
    def known_len(self) -> int:
        return self.end


def given_texts(target: Target, items: list[tuple]) -> list[GivenText]:
    eos = set(target.eos_token_ids)
    pad = min(eos) if eos else 0
    out = []
    for _, p, ans in items:
        if not ans:
            raise ValueError("a given answer must have at least one token")
        out.append(GivenText(list(p), list(ans), [pad] * LOOKAHEAD, "eos" if ans[-1] in eos else "length"))
    return out


def given_data(
    target: Target, feature_layers: list[int], items: list[tuple], topk: int, batch_size: int | None = None,
    feature_dtype: torch.dtype = torch.bfloat16, with_lookahead: bool = False, log=None, hidden: bool = False,
) -> tuple[list[GivenText], list[TeacherRecord]]:  # fmt: skip
    """Given texts and their prefill (cached on disk, keyed by the answer's tokens too, so a regenerated answer to
    the same prompt never collides with a given one)."""
    t0 = time.perf_counter()
    texts = given_texts(target, items)
    root = cache_dir() / "prefill"
    recs: list[TeacherRecord | None] = []
    paths = []
    for (pid, p, ans), _text in zip(items, texts):
        ident = {
            "given": True, "weights": target.fingerprint, "name": target.info.to_dict(), "dtype": str(target.dtype),
            "device": target.device.type, "prompt": list(map(int, p)), "answer": list(map(int, ans)), "pad": LOOKAHEAD,
            "layers": list(feature_layers), "topk": topk, "feature_dtype": str(feature_dtype), "lookahead": with_lookahead,
            **({"hidden": True} if hidden else {}),
        }  # fmt: skip
        path = root / (hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24] + ".msgpack")
        paths.append(path)
        try:
            rec = decode_teacher(path.read_bytes(), hidden_size=target.info.hidden_size)
            if hidden and rec.hidden is None:
                raise RecordError("the cache entry carries no hidden state")
            rec.prompt_id = pid
            recs.append(rec)
        except (OSError, RecordError):
            recs.append(None)
    missing = [i for i, r in enumerate(recs) if r is None]
    if missing:
        todo = [
            (
                items[i][0],
                texts[i].tokens if with_lookahead else texts[i].prompt_ids + texts[i].answer,
                texts[i].prompt_len,
            )
            for i in missing
        ]
        fresh = prefill(
            target, feature_layers, todo, topk, batch_size=batch_size, feature_dtype=feature_dtype, hidden=hidden
        )
        root.mkdir(parents=True, exist_ok=True)
        for i, rec in zip(missing, fresh):
            recs[i] = rec
            tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(encode_teacher(rec))
            tmp.replace(paths[i])
        if log is not None:
            log(
                f"target text: {len(missing)} of {len(items)} given answers prefilled ({time.perf_counter() - t0:.0f}s, no decoding)"
            )
    return texts, recs  # type: ignore[return-value]


def text_data(
    target: Target, feature_layers: list[int], items: list[tuple], max_new_tokens: int, topk: int, batch_size: int | None = None,
    feature_dtype: torch.dtype = torch.bfloat16, with_lookahead: bool = False, log=None, hidden: bool = False,
) -> tuple[list[GreedyText], list[TeacherRecord]]:  # fmt: skip
    """`greedy.teacher_data` for items of either kind, in the items' order: (id, prompt) items get the target's
    greedy answer, (id, prompt, answer) items their given answer."""
    greedy = [i for i, it in enumerate(items) if len(it) == 2]
    given = [i for i, it in enumerate(items) if len(it) == 3]
    texts: list = [None] * len(items)
    recs: list = [None] * len(items)
    if greedy:
        t, r = teacher_data(
            target, feature_layers, [items[i] for i in greedy], max_new_tokens, topk, batch_size=batch_size,
            feature_dtype=feature_dtype, with_lookahead=with_lookahead, log=log, hidden=hidden,
        )  # fmt: skip
        for i, a, b in zip(greedy, t, r):
            texts[i], recs[i] = a, b
    if given:
        t, r = given_data(
            target,
            feature_layers,
            [items[i] for i in given],
            topk,
            batch_size,
            feature_dtype,
            with_lookahead,
            log,
            hidden,
        )
        for i, a, b in zip(given, t, r):
            texts[i], recs[i] = a, b
    return texts, recs


def plain(items: list[tuple]) -> list[tuple[str, list[int]]]:
    """(id, prompt ids) of items of either kind (for paths that decode the target's own text)."""
    return [(it[0], it[1]) for it in items]
