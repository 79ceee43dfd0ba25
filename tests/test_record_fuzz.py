"""Property-based fuzzing of the wire format: for ANY bytes, every decoder either returns a record that satisfies
the record's invariants or raises RecordError (never another exception), and a queue shard answers "ok" or
"rejected" and counts every rejection. Inputs: byte flips and truncations of valid records (with the CRC left as
is, and recomputed, as a hostile producer would), and hostile but well-formed msgpack spliced into valid bodies.
Plus the memory bound: a deep or wide `meta` costs the decoder a small multiple of its input bytes."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_record import body, frame, make_record, make_teacher, topk_dist

from dopd.common.errors import RecordError
from dopd.common.record import (
    HEADER,
    KIND_TEACHER,
    LOGPROB_EPS,
    PROB_SUM_EPS,
    Blocks,
    ExperienceRecord,
    TeacherRecord,
    decode_record,
    decode_teacher,
    encode_record,
    encode_teacher,
)
from dopd.queue import QueueShard

VOCAB = 1000
# deterministic (a CI run is repeatable); `pytest --hypothesis-seed=N -p no:randomly` explores other inputs
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _teacher_record() -> ExperienceRecord:
    rec = make_record(seed=5)
    n, g = rec.num_tokens, np.random.default_rng(5)
    rec.teacher_topk_ids = g.integers(0, VOCAB, (n - 1, 3)).astype(np.int32)
    rec.teacher_topk_probs, rec.teacher_tail = topk_dist(g, (n - 1,), 3)
    return rec


VALID = [encode_record(make_record(seed=1)), encode_record(_teacher_record())]
VALID_TEACHER = encode_teacher(make_teacher())


def check_invariants(rec: ExperienceRecord) -> None:
    """What a learner relies on, written out plainly (an oracle independent of the decoder's own checks)."""
    t = rec.token_ids
    n = len(t)
    assert t.ndim == 1 and n >= 1 and 1 <= rec.prompt_len <= n and all(0 <= int(x) < VOCAB for x in t)
    assert all(isinstance(v, int) and v >= 0 for v in (rec.actor_id, rec.incarnation, rec.seq_no, rec.policy_version))
    assert isinstance(rec.meta, dict) and all(
        v is None or isinstance(v, (int, float, str, bool)) for v in rec.meta.values()
    )
    b = rec.blocks
    M, K = b.draft_tokens.shape
    k = b.target_topk_ids.shape[2]
    assert K >= 1 and k >= 1
    for f in Blocks.FIELDS:
        assert getattr(b, f).shape[:1] == (M,)
    for m in range(M):
        assert 1 <= int(b.anchor[m]) <= n and int(b.source[m]) in (0, 1, 2) and int(b.streams[m]) in (1, 2, 3)
        for j in range(K):
            assert (
                0 <= int(b.draft_tokens[m, j]) < VOCAB
                and np.isfinite(b.draft_logprobs[m, j])
                and b.draft_logprobs[m, j] <= LOGPROB_EPS
            )
            p = [float(x) for x in b.target_topk_probs[m, j]]
            tail = float(b.target_tail[m, j])
            assert all(0 <= x <= 1 for x in p + [tail, float(b.target_draft_prob[m, j])])
            assert sum(p) + tail <= 1 + PROB_SUM_EPS + 1e-6
            assert all(0 <= int(x) < VOCAB for x in b.target_topk_ids[m, j])
    if rec.features is not None:
        assert rec.features.shape[0] == n - 1 and torch.isfinite(rec.features.float()).all()
    if rec.teacher_topk_ids is not None:
        assert rec.teacher_topk_ids.shape[0] == n - 1 and rec.teacher_tail.shape == (n - 1,)
        assert np.isfinite(rec.teacher_topk_probs).all() and (rec.teacher_topk_probs >= 0).all()
        assert (rec.teacher_topk_probs.sum(-1) + rec.teacher_tail <= 1 + PROB_SUM_EPS + 1e-6).all()


def contract(data) -> str:
    """Decode as the learner does: 'ok' with every invariant holding, or 'rejected' by RecordError. Anything else
    (another exception type) propagates and fails the test."""
    try:
        rec = decode_record(data, vocab_size=VOCAB)
    except RecordError as e:
        assert str(e), "a RecordError must say what is wrong"
        return "rejected"
    check_invariants(rec)
    return "ok"


def shard_contract(inputs: list) -> None:
    q = QueueShard(0, max_bytes=2**30)
    answers = [q.put(x) for x in inputs]  # must not raise
    assert set(answers) <= {"ok", "rejected"}
    s = q.get_stats()
    assert s["rejected"] == answers.count("rejected") and s["accepted"] == answers.count("ok")


def reframed(data: bytes) -> bytes:
    """The same body behind a fresh, valid header (size and CRC recomputed): only the body's checks remain."""
    return frame(None, ids=(3, 77, 12, 5), raw_body=data[HEADER.size :])


flips = st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8)


def flip(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, x in edits:
        out[pos % len(out)] ^= x
    return bytes(out)


@FUZZ
@given(which=st.integers(0, 1), edits=flips, fix_crc=st.booleans())
def test_byte_flips(which, edits, fix_crc):
    data = flip(VALID[which], edits)
    if fix_crc:
        data = reframed(data)
    contract(data)
    shard_contract([data])


@FUZZ
@given(which=st.integers(0, 1), cut=st.integers(0, 10**9), fix_header=st.booleans())
def test_truncations(which, cut, fix_header):
    full = VALID[which]
    data = full[: cut % len(full)]
    if fix_header and len(data) >= HEADER.size:
        data = reframed(data)
    assert contract(data) == "rejected"
    shard_contract([data])


leaves = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=48) | st.sampled_from(["int32", "float32", "bfloat16", "uint8", "bool", "object", "<U8"])
)  # fmt: skip
hostile = st.recursive(
    leaves, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=5), max_leaves=25
)
ARRAYS = (
    ["token_ids", "features"]
    + [f"blocks.{f}" for f in Blocks.FIELDS]
    + [f"teacher.{f}" for f in ("topk_ids", "topk_probs", "tail")]
)
PATHS = (
    ["prompt_id", "prompt_len", "meta", "blocks", "teacher", "meta.x"]
    + ARRAYS
    + [f"{a}.{p}" for a in ARRAYS for p in ("s", "b", "d", "t")]
)


def splice(msg: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    obj = msg
    for p in parents:
        obj = obj[p] if isinstance(obj, dict) and isinstance(obj.get(p), dict) else {}
    obj[leaf] = value


@FUZZ
@given(which=st.integers(0, 1), path=st.sampled_from(PATHS), value=hostile)
def test_hostile_msgpack_in_a_valid_body(which, path, value):
    msg = body(VALID[which])
    splice(msg, path, value)
    data = frame(msg)
    contract(data)
    shard_contract([data])


@FUZZ
@given(value=hostile)
def test_hostile_msgpack_as_the_whole_body(value):
    assert contract(frame(value)) == "rejected"


@FUZZ
@given(
    field=st.sampled_from([f for f in Blocks.FIELDS] + ["token_ids", "teacher_topk_ids", "teacher_topk_probs", "teacher_tail"]),
    index=st.integers(0, 10**6), value=st.floats() | st.integers(-(2**31), 2**31 - 1),
)  # fmt: skip
def test_planted_values_are_accepted_only_when_valid(field, index, value):
    """One element set to any number (what 163 single-byte flips did on the old format): either the record still
    satisfies every invariant, or it is refused."""
    rec = _teacher_record()
    a = getattr(rec if not hasattr(rec.blocks, field) else rec.blocks, field)
    if a.size == 0:
        return
    flat = a.reshape(-1)
    with np.errstate(all="ignore"):
        try:
            flat[index % flat.size] = value
        except (OverflowError, ValueError):  # not representable in this dtype: not an input the wire can carry
            return
    contract(encode_record(rec))


@FUZZ
@given(
    edits=flips,
    fix_crc=st.booleans(),
    path=st.sampled_from(["prompt_len", "token_ids.s", "features.b", "topk_probs.b", "tail.s", "x"]),
    value=hostile,
)
def test_teacher_decoder_contract(edits, fix_crc, path, value):
    """The teacher decoder (actors' SFT data, the on-disk prefill cache) keeps the same contract."""
    data = flip(VALID_TEACHER, edits)
    if fix_crc:
        data = frame(None, kind=KIND_TEACHER, ids=(0, 0, 0, 0), raw_body=data[HEADER.size :])
    msg = msgpack.unpackb(VALID_TEACHER[HEADER.size :])
    splice(msg, path, value)
    for d in (data, frame(msg, kind=KIND_TEACHER, ids=(0, 0, 0, 0))):
        try:
            rec = decode_teacher(d, vocab_size=50)
        except RecordError:
            continue
        assert isinstance(rec, TeacherRecord) and rec.features.shape[0] == rec.num_tokens - 1
        assert np.isfinite(rec.tail).all() and (rec.topk_ids < 50).all() and 1 <= rec.prompt_len <= rec.num_tokens


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except RecordError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("shape", ["deep", "wide", "wide_of_deep", "long_strings"])
def test_decoded_memory_is_bounded_by_the_input(shape):
    """The old decoder turned a 64 MiB record of nested empty containers in `meta` into 4.5 GB (72x its size).
    Now the decoder refuses any container `meta` does not allow before building it: its peak is a small multiple
    of the input bytes, whatever the nesting."""
    size = 4 * 2**20
    meta = {
        "deep": b"\x91" * size + b"\xc0",  # [[[[...]]]]
        "wide": b"\xdd" + (size // 2).to_bytes(4, "big") + b"\x90" * (size // 2),  # one list of 2M empty lists
        "wide_of_deep": b"\xde\x00\x10"
        + b"".join(bytes([0xA1, 65 + i]) + b"\x91" * (size // 16) + b"\xc0" for i in range(16)),
        "long_strings": b"\x8f"
        + b"".join(bytes([0xA1, 65 + i]) + b"\xdb" + (2**16).to_bytes(4, "big") + b"x" * 2**16 for i in range(15)),
    }[shape]
    good = body(VALID[0])
    del good["meta"]
    raw = msgpack.packb(good, use_bin_type=True)
    raw = bytes([raw[0] + 1]) + raw[1:] + b"\xa4meta" + meta  # one more top-level entry: the hostile meta
    data = frame(None, raw_body=raw)
    if shape != "long_strings":  # 15 strings of 64 KiB are a legal meta: it decodes, to their size
        with pytest.raises(RecordError, match="meta"):
            decode_record(data)
    peak = _peak_bytes(lambda: decode_record(data))
    assert peak <= 2.5 * len(data) + 2**20, (
        f"{shape}: peak {peak / 2**20:.1f} MiB for {len(data) / 2**20:.1f} MiB of input"
    )
