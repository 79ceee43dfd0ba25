"""The experience record round-trips bit-exactly through msgpack; bad bytes raise a clear RecordError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from dopd.common.errors import RecordError
from dopd.common.record import (
    Blocks,
    ExperienceRecord,
    TeacherRecord,
    decode_record,
    decode_teacher,
    encode_record,
    encode_teacher,
)


def make_record(seed=0, n=50, M=7, K=4, k=5, F=12) -> ExperienceRecord:
    g = np.random.default_rng(seed)
    blocks = Blocks(
        anchor=g.integers(10, n, M).astype(np.int32),
        draft_tokens=g.integers(0, 1000, (M, K)).astype(np.int32),
        draft_logprobs=g.normal(size=(M, K)).astype(np.float32),
        target_topk_ids=g.integers(0, 1000, (M, K, k)).astype(np.int32),
        target_topk_probs=g.random((M, K, k)).astype(np.float32),
        target_tail=g.random((M, K)).astype(np.float32),
        target_draft_prob=g.random((M, K)).astype(np.float32),
        accept_mask=g.random((M, K)) < 0.5,
        source=g.integers(0, 3, M).astype(np.uint8),
        streams=g.integers(1, 4, M).astype(np.uint8),
    )
    feats = torch.randn(n - 1, F, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return ExperienceRecord("p/1", g.integers(0, 1000, n).astype(np.int32), 9, blocks, feats, actor_id=3, incarnation=77, seq_no=12, policy_version=5, meta={"round": 2})


def test_round_trip_is_bit_exact():
    rec = make_record()
    out = decode_record(encode_record(rec))
    assert (out.prompt_id, out.prompt_len, out.uid, out.policy_version, out.meta) == ("p/1", 9, (3, 77, 12), 5, {"round": 2})
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
    for junk in (b"", b"garbage", b"\x00" * 64, np.random.default_rng(0).bytes(4096), msgpack.packb({"a": 1}), msgpack.packb([1, 2, 3])):
        with pytest.raises(RecordError):
            decode_record(junk)
    with pytest.raises(RecordError, match="must be bytes"):
        decode_record("not bytes")  # type: ignore[arg-type]


def test_schema_version_and_trailing_bytes():
    data = encode_record(make_record())
    msg = msgpack.unpackb(data)
    msg["schema"] = 99
    with pytest.raises(RecordError, match="schema 99"):
        decode_record(msgpack.packb(msg))
    with pytest.raises(RecordError, match="trailing"):
        decode_record(data + b"\x00")


def test_oversized_raises_on_both_sides():
    rec = make_record(n=400, F=512)
    data = encode_record(rec)
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode_record(data, max_bytes=len(data) - 1)
    with pytest.raises(RecordError, match="exceeds the limit"):
        encode_record(rec, max_bytes=1000)


def test_inconsistent_shapes_raise():
    data = encode_record(make_record())
    msg = msgpack.unpackb(data)
    msg["blocks"]["accept_mask"]["s"] = [3, 4]  # wrong M; byte count no longer fits either
    with pytest.raises(RecordError):
        decode_record(msgpack.packb(msg))
    msg = msgpack.unpackb(data)
    msg["features"]["s"] = [10, 12]
    with pytest.raises(RecordError):
        decode_record(msgpack.packb(msg))
    rec = make_record()
    rec.blocks.anchor[0] = 10_000  # beyond the sequence
    with pytest.raises(RecordError, match="anchors"):
        encode_record(rec)
    rec = make_record()
    rec.blocks.target_tail[0, 0] = np.nan
    with pytest.raises(RecordError, match="NaN"):
        encode_record(rec)


def test_teacher_arrays_round_trip_and_checks():
    rec = make_record()
    n, g = rec.num_tokens, np.random.default_rng(3)
    rec.teacher_topk_ids = g.integers(0, 1000, (n - 1, 4)).astype(np.int32)
    rec.teacher_topk_probs = g.random((n - 1, 4)).astype(np.float32)
    rec.teacher_tail = g.random(n - 1).astype(np.float32)
    out = decode_record(encode_record(rec))
    assert out.teacher_topk_ids.tobytes() == rec.teacher_topk_ids.tobytes() and out.teacher_tail.tobytes() == rec.teacher_tail.tobytes()
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
        encode_record(rec)
    rec.blocks.streams[0] = 4
    with pytest.raises(RecordError, match="streams"):
        encode_record(rec)


def test_teacher_record_round_trip():
    g = np.random.default_rng(1)
    rec = TeacherRecord("t", g.integers(0, 50, 20).astype(np.int32), 5, torch.randn(19, 8).to(torch.bfloat16), g.integers(0, 50, (19, 4)).astype(np.int32), g.random((19, 4)).astype(np.float32), g.random(19).astype(np.float32))
    out = decode_teacher(encode_teacher(rec))
    assert torch.equal(out.features.view(torch.int16), rec.features.view(torch.int16))
    assert out.topk_probs.tobytes() == rec.topk_probs.tobytes()
    with pytest.raises(RecordError):
        decode_teacher(b"\x93junk")
