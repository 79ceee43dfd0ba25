"""The experience record round-trips bit-exactly; bad bytes and bad values raise a RecordError naming the field."""

from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch

from dopd.common.errors import RecordError
from dopd.common.record import (
    HEADER,
    KIND_EXPERIENCE,
    KIND_TEACHER,
    MAGIC,
    SCHEMA_VERSION,
    Blocks,
    ExperienceRecord,
    TeacherRecord,
    decode_record,
    decode_teacher,
    encode_record,
    encode_teacher,
    read_header,
)


def topk_dist(g, shape, k):
    """Top-k probabilities (descending) and tail mass of random distributions: top-k + tail == 1."""
    p = g.dirichlet(np.ones(k + 3), size=shape).astype(np.float32)
    top = -np.sort(-p[..., :k], axis=-1)
    return top, np.clip(1 - top.sum(-1), 0, None).astype(np.float32)


def make_record(seed=0, n=50, M=7, K=4, k=5, F=12) -> ExperienceRecord:
    g = np.random.default_rng(seed)
    probs, tail = topk_dist(g, (M, K), k)
    blocks = Blocks(
        anchor=g.integers(10, n, M).astype(np.int32),
        draft_tokens=g.integers(0, 1000, (M, K)).astype(np.int32),
        draft_logprobs=-g.exponential(size=(M, K)).astype(np.float32),
        target_topk_ids=g.integers(0, 1000, (M, K, k)).astype(np.int32),
        target_topk_probs=probs,
        target_tail=tail,
        target_draft_prob=g.random((M, K)).astype(np.float32),
        accept_mask=g.random((M, K)) < 0.5,
        source=g.integers(0, 3, M).astype(np.uint8),
        streams=g.integers(1, 4, M).astype(np.uint8),
    )
    feats = torch.randn(n - 1, F, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return ExperienceRecord(
        "p/1",
        g.integers(0, 1000, n).astype(np.int32),
        9,
        blocks,
        feats,
        actor_id=3,
        incarnation=77,
        seq_no=12,
        policy_version=5,
        meta={"round": 2},
    )


def test_round_trip_is_bit_exact():
    rec = make_record()
    out = decode_record(encode_record(rec))
    assert (out.prompt_id, out.prompt_len, out.uid, out.policy_version, out.meta) == (
        "p/1",
        9,
        (3, 77, 12),
        5,
        {"round": 2},
    )
    np.testing.assert_array_equal(out.token_ids, rec.token_ids)
    assert out.features.dtype == torch.bfloat16
    assert torch.equal(out.features.view(torch.int16), rec.features.view(torch.int16))
    for f in Blocks.FIELDS:
        a, b = getattr(out.blocks, f), getattr(rec.blocks, f)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_features_optional_and_fp32():
    rec = make_record()
    rec.features = None
    assert decode_record(encode_record(rec)).features is None
    rec.features = torch.randn(49, 3)
    assert torch.equal(decode_record(encode_record(rec)).features, rec.features)


@pytest.mark.parametrize("cut", [1, 10, 100, -1])
def test_truncated_bytes_raise(cut):
    data = encode_record(make_record())
    with pytest.raises(RecordError):
        decode_record(data[:cut] if cut > 0 else data[:-1])


def test_garbage_and_wrong_kind_raise():
    for junk in (
        b"",
        b"garbage",
        b"\x00" * 64,
        np.random.default_rng(0).bytes(4096),
        msgpack.packb({"a": 1}),
        msgpack.packb([1, 2, 3]),
    ):
        with pytest.raises(RecordError):
            decode_record(junk)
    with pytest.raises(RecordError, match="must be bytes"):
        decode_record("not bytes")  # type: ignore[arg-type]


def body(data: bytes) -> dict:
    """The msgpack body of an encoded record, as plain Python (to tamper with)."""
    return msgpack.unpackb(data[HEADER.size :])


def frame(msg, kind=KIND_EXPERIENCE, ids=(3, 77, 12, 5), schema=SCHEMA_VERSION, raw_body: bytes | None = None) -> bytes:
    """Bytes with a well-formed header (right size and CRC) around any body: what a hostile producer can send."""
    b = raw_body if raw_body is not None else msgpack.packb(msg, use_bin_type=True)
    head = struct.pack("<4sBBqqqqI", MAGIC, kind, schema, *ids, len(b))
    return head + struct.pack("<I", zlib.crc32(b, zlib.crc32(head))) + b


def test_schema_version_and_trailing_bytes():
    data = bytearray(encode_record(make_record()))
    data[5] = 99  # the header's schema byte
    with pytest.raises(RecordError, match="schema 99"):
        decode_record(bytes(data))
    data = encode_record(make_record())
    with pytest.raises(RecordError, match="trailing"):
        decode_record(data + b"\x00")
    with pytest.raises(RecordError, match="trailing bytes after the message body"):
        decode_record(frame(None, raw_body=data[HEADER.size :] + b"\xc0"))


def test_oversized_raises_on_both_sides():
    rec = make_record(n=400, F=512)
    data = encode_record(rec)
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode_record(data, max_bytes=len(data) - 1)
    with pytest.raises(RecordError, match="exceeds the limit"):
        encode_record(rec, max_bytes=1000)


def test_header_is_read_without_the_body():
    rec = make_record()
    data = encode_record(rec)
    h = read_header(data)
    assert (h.uid, h.policy_version, h.body_bytes) == (rec.uid, 5, len(data) - HEADER.size)
    damaged = bytearray(data)
    damaged[-3] ^= 0xFF
    assert read_header(bytes(damaged)).uid == rec.uid  # the header alone does not see the body's damage ...
    with pytest.raises(RecordError, match="CRC"):
        decode_record(bytes(damaged))  # ... the full decode does
    damaged = bytearray(data)
    damaged[30] ^= 0x01  # the policy version, in the header: covered by the CRC too
    assert read_header(bytes(damaged)).policy_version != 5
    with pytest.raises(RecordError, match="CRC"):
        decode_record(bytes(damaged))
    with pytest.raises(RecordError, match="a teacher record, not an experience record"):
        read_header(frame({}, kind=KIND_TEACHER))
    with pytest.raises(RecordError, match="'seq_no' is negative"):
        read_header(frame({}, ids=(0, 0, -1, 0)))


def test_a_memoryview_cast_cannot_shrink_the_byte_bound():
    data = encode_record(make_record())
    view = memoryview(data[: len(data) // 4 * 4]).cast("I")  # len(view) is a quarter of its bytes
    with pytest.raises(RecordError, match="exceeds the limit"):
        read_header(view, max_bytes=len(data) // 2)


def test_inconsistent_shapes_raise():
    data = encode_record(make_record())
    msg = body(data)
    msg["blocks"]["accept_mask"]["s"] = [3, 4]  # wrong M; byte count no longer fits either
    with pytest.raises(RecordError, match="accept_mask"):
        decode_record(frame(msg))
    msg = body(data)
    msg["features"]["s"] = [10, 12]
    with pytest.raises(RecordError, match="features"):
        decode_record(frame(msg))
    rec = make_record()
    rec.blocks.anchor[0] = 10_000  # beyond the sequence: encodes (values are the learner's to check), never decodes
    with pytest.raises(RecordError, match="anchors"):
        decode_record(encode_record(rec))
    rec = make_record()
    rec.blocks.target_tail[0, 0] = np.nan
    with pytest.raises(RecordError, match="NaN"):
        decode_record(encode_record(rec))


def _set(rec, path, value):
    obj = rec.blocks if path.startswith("blocks.") else rec
    a = getattr(obj, path.split(".")[-1])
    a[(0,) * a.ndim] = value


@pytest.mark.parametrize("path, value, match", [
    ("blocks.target_topk_probs", 1.5, "outside \\[0, 1\\]"),
    ("blocks.target_topk_probs", -0.5, "outside \\[0, 1\\]"),
    ("blocks.target_topk_probs", 1e30, "outside \\[0, 1\\]"),
    ("blocks.target_tail", 0.99, "sums above 1"),
    ("blocks.target_draft_prob", 1.5, "target_draft_prob"),
    ("blocks.draft_logprobs", 0.5, "above 0"),
    ("blocks.draft_logprobs", -np.inf, "draft_logprobs holds NaN or inf"),
    ("blocks.draft_tokens", -1, "draft_tokens holds negative"),
    ("blocks.target_topk_ids", -7, "target_topk_ids holds negative"),
    ("blocks.target_topk_ids", 5000, "target_topk_ids holds token ids outside the vocabulary"),
    ("token_ids", 1000, "token_ids holds token ids outside"),
    ("blocks.source", 9, "source"),
])  # fmt: skip
def test_values_out_of_range_are_refused_by_name(path, value, match):
    rec = make_record()
    rec.blocks.target_topk_probs[0, 0] = 0.01  # room for a tail that fits, so only the planted value is wrong
    _set(rec, path, value)
    with pytest.raises(RecordError, match=match):
        decode_record(encode_record(rec), vocab_size=1000)


def test_features_non_finite_bits_are_refused():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rec = make_record()
        rec.features = rec.features.to(dtype)
        rec.features[3, 4] = float("inf")
        with pytest.raises(RecordError, match="features hold NaN or inf"):
            decode_record(encode_record(rec))


@pytest.mark.parametrize("field, value, match", [
    ("prompt_len", float("inf"), "'prompt_len' must be an integer"),
    ("prompt_len", 2**64 - 1, "prompt_len"),
    ("prompt_len", 0, "prompt_len"),
    ("prompt_id", [1, 2], "'prompt_id' must be a string"),
    ("meta", {"a": [[]]}, "'meta.a' must be a number"),
    ("meta", {str(i): i for i in range(17)}, "'meta' has 17 entries"),
    ("meta", [[1]], "'meta' must be a map"),
    ("features", 5, "'features' must be a map"),
    ("extra", 1, "unknown field 'record.extra'"),
])  # fmt: skip
def test_hostile_body_fields_are_refused_by_name(field, value, match):
    msg = body(encode_record(make_record()))
    if field not in msg:
        del msg["meta"]  # keep the entry count, so the unknown name is what is refused
    msg[field] = value
    with pytest.raises(RecordError, match=match):
        decode_record(frame(msg))


def test_hostile_shapes_and_nesting():
    msg = body(encode_record(make_record()))
    msg["blocks"]["anchor"] = {"d": "int32", "s": [], "b": b"\x01\x00\x00\x00"}  # 0-d
    with pytest.raises(RecordError, match="blocks.anchor"):
        decode_record(frame(msg))
    msg = body(encode_record(make_record()))
    msg["blocks"]["anchor"]["s"] = [2**62, 2**62, 2**62]  # product overflows int64
    with pytest.raises(RecordError, match="blocks.anchor"):
        decode_record(frame(msg))
    msg = body(encode_record(make_record()))
    msg["blocks"]["anchor"] = {"d": "int32", "s": [0, 2**40], "b": b""}  # zero elements, absurd dimension
    with pytest.raises(RecordError, match="blocks.anchor"):
        decode_record(frame(msg))
    deep = b"\x81\xa4meta" + b"\x91" * 5000 + b"\xc0"  # 5,000 levels of nesting
    with pytest.raises(RecordError, match="'meta' must be a map"):
        decode_record(frame(None, raw_body=deep))
    wide = b"\x81\xa4meta\xde\xff\xff" + b"\xa0\xc0" * 0xFFFF  # a 65,535-entry map where 16 are allowed
    with pytest.raises(RecordError, match="'meta' has 65535 entries"):
        decode_record(frame(None, raw_body=wide))


def test_teacher_arrays_round_trip_and_checks():
    rec = make_record()
    n, g = rec.num_tokens, np.random.default_rng(3)
    rec.teacher_topk_ids = g.integers(0, 1000, (n - 1, 4)).astype(np.int32)
    rec.teacher_topk_probs, rec.teacher_tail = topk_dist(g, (n - 1,), 4)
    out = decode_record(encode_record(rec))
    assert (
        out.teacher_topk_ids.tobytes() == rec.teacher_topk_ids.tobytes()
        and out.teacher_tail.tobytes() == rec.teacher_tail.tobytes()
    )
    t = out.as_teacher()
    assert t.topk_probs.shape == (n - 1, 4) and t.features.shape[0] == n - 1
    rec.teacher_tail = rec.teacher_tail[:-1]
    with pytest.raises(RecordError, match="teacher"):
        encode_record(rec)
    with pytest.raises(RecordError, match="no per-position teacher"):
        make_record().as_teacher()


def test_stream_flags_are_validated():
    rec = make_record()
    rec.blocks.streams[0] = 0
    with pytest.raises(RecordError, match="streams"):
        decode_record(encode_record(rec))
    rec.blocks.streams[0] = 4
    with pytest.raises(RecordError, match="streams"):
        decode_record(encode_record(rec))


def make_teacher(seed=1, n=20, k=4, F=8) -> TeacherRecord:
    g = np.random.default_rng(seed)
    probs, tail = topk_dist(g, (n - 1,), k)
    return TeacherRecord(
        "t",
        g.integers(0, 50, n).astype(np.int32),
        5,
        torch.randn(n - 1, F).to(torch.bfloat16),
        g.integers(0, 50, (n - 1, k)).astype(np.int32),
        probs,
        tail,
    )


def test_teacher_record_round_trip():
    rec = make_teacher()
    out = decode_teacher(encode_teacher(rec))
    assert torch.equal(out.features.view(torch.int16), rec.features.view(torch.int16))
    assert out.topk_probs.tobytes() == rec.topk_probs.tobytes()
    with pytest.raises(RecordError):
        decode_teacher(b"\x93junk")
    with pytest.raises(RecordError, match="an experience record, not a teacher record"):
        decode_teacher(encode_record(make_record()))


def teacher_body(rec: TeacherRecord) -> dict:
    return msgpack.unpackb(encode_teacher(rec)[HEADER.size :])


@pytest.mark.parametrize("tamper, match", [
    (lambda m: m["topk_probs"].update(s=[18, 4], b=m["topk_probs"]["b"][:-16]), "teacher.topk_probs must be \\(19, 4\\)"),
    (lambda m: m.update(prompt_len=21), "prompt_len"),
    (lambda m: m.update(prompt_len=-1), "prompt_len"),
    (lambda m: m["tail"].update(b=np.full(19, np.nan, np.float32).tobytes()), "NaN"),
    (lambda m: m["topk_ids"].update(b=np.full((19, 4), 60, np.int32).tobytes()), "vocabulary"),
    (lambda m: m["features"].update(b=np.full((19, 8), 0x7F80, np.uint16).tobytes()), "features hold NaN or inf"),
    (lambda m: m.pop("features"), "missing field 'features'"),
])  # fmt: skip
def test_teacher_values_are_validated(tamper, match):
    """The teacher record guards the on-disk prefill cache too: a damaged or hostile file is a RecordError."""
    msg = teacher_body(make_teacher())
    tamper(msg)
    with pytest.raises(RecordError, match=match):
        decode_teacher(frame(msg, kind=KIND_TEACHER, ids=(0, 0, 0, 0)), vocab_size=50)


def test_target_hidden_round_trips_and_is_checked():
    """The target's final hidden state (exact full-vocabulary targets): bit-exact round trip in bf16, one row per
    answer token; a record without it has no `hidden` field at all (older readers and caches stay valid)."""
    rec = make_record()
    a = rec.num_tokens - rec.prompt_len
    rec.target_hidden = torch.randn(a, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    data = encode_record(rec)
    out = decode_record(data, hidden_size=16)
    assert out.target_hidden.dtype == torch.bfloat16 and out.target_hidden.shape == (a, 16)
    assert torch.equal(out.target_hidden.view(torch.int16), rec.target_hidden.view(torch.int16))
    assert len(data) - len(encode_record(make_record())) >= a * 16 * 2  # bf16: 2 bytes per value
    assert "hidden" not in msgpack.unpackb(encode_record(make_record())[HEADER.size :])
    assert decode_record(encode_record(make_record())).target_hidden is None
    with pytest.raises(RecordError, match="hidden size is 32"):
        decode_record(data, hidden_size=32)
    bad = make_record()
    bad.target_hidden = rec.target_hidden[:-1]
    with pytest.raises(RecordError, match="field 'hidden' must be"):
        decode_record(encode_record(bad))
    bad.target_hidden = torch.full((a, 16), float("inf")).to(torch.bfloat16)
    with pytest.raises(RecordError, match="'hidden' holds NaN or inf"):
        decode_record(encode_record(bad))
    t = make_teacher()
    t.hidden = torch.randn(t.num_tokens - t.prompt_len, 8).to(torch.bfloat16)
    back = decode_teacher(encode_teacher(t), hidden_size=8)
    assert torch.equal(back.hidden.view(torch.int16), t.hidden.view(torch.int16))
