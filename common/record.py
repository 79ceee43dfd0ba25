"""The experience record: what an actor sends and a learner trains on, and its msgpack wire format.

One record per rolled-out sequence: the committed tokens (prompt + answer), the target features the drafter
needs (bf16 by default), and its blocks: every verification step of the rollout and every replayed block, with
the draft tokens, the drafter's log-probs when it drafted them, the target's top-k distribution (+ tail mass) at
each block position, and the accept mask. Blocks are stored column-wise (arrays [M, K, ...]) so a record is a
handful of contiguous arrays, cheap to encode and to batch.

Wire format: a msgpack map with a schema version; arrays travel as {dtype, shape, raw little-endian bytes}; no
pickle, so bytes from anywhere can be decoded safely. Decoding checks sizes, dtypes, shapes and ranges and raises
`RecordError` naming the problem: truncated, oversized or garbage bytes never reach a learner as a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from .errors import RecordError

SCHEMA_VERSION = 2  # 2: blocks carry the loss streams they feed; records may carry the per-position teacher
KIND = "dopd.experience"
SOURCE_ROLLOUT, SOURCE_REPLAY, SOURCE_SHUFFLED = 0, 1, 2
SOURCES = {"rollout": SOURCE_ROLLOUT, "replay": SOURCE_REPLAY, "shuffled": SOURCE_SHUFFLED}
# which loss streams a block feeds (bit flags): the accepted stream (accepted positions + the first rejection,
# labelled by the target) and the rejected stream (drafted tokens from the first rejection on, scored by the target)
STREAM_ACC, STREAM_REJ = 1, 2
STREAM_BOTH = STREAM_ACC | STREAM_REJ
DEFAULT_MAX_BYTES = 64 * 2**20

_TEACHER = ("topk_ids", "topk_probs", "tail")
_NP_DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32, "float16": np.float16, "bool": np.bool_, "uint8": np.uint8}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Blocks:
    """M blocks of K draft positions (struct of arrays)."""

    anchor: np.ndarray  # [M] int32 prefix length a; the block's positions are a .. a+K-1
    draft_tokens: np.ndarray  # [M, K] int32
    draft_logprobs: np.ndarray  # [M, K] float32 raw log q(d) under the policy that drafted
    target_topk_ids: np.ndarray  # [M, K, k] int32
    target_topk_probs: np.ndarray  # [M, K, k] float32 (T=1)
    target_tail: np.ndarray  # [M, K] float32 mass outside the top-k
    target_draft_prob: np.ndarray  # [M, K] float32 p(d)
    accept_mask: np.ndarray  # [M, K] bool
    source: np.ndarray  # [M] uint8: 0 rollout, 1 replay, 2 shuffled anchors (the random-anchor ablation)
    streams: np.ndarray  # [M] uint8 bit flags STREAM_ACC | STREAM_REJ: the loss streams this block feeds

    FIELDS = (
        "anchor", "draft_tokens", "draft_logprobs", "target_topk_ids", "target_topk_probs",
        "target_tail", "target_draft_prob", "accept_mask", "source", "streams",
    )  # fmt: skip

    def __len__(self) -> int:
        return int(self.anchor.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.draft_tokens.shape[1])

    @classmethod
    def concat(cls, parts: list[Blocks]) -> Blocks:
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts], axis=0) for f in cls.FIELDS})

    @classmethod
    def empty(cls, K: int, k: int) -> Blocks:
        z = lambda *s, dt=np.float32: np.zeros(s, dtype=dt)  # noqa: E731
        return cls(
            z(0, dt=np.int32), z(0, K, dt=np.int32), z(0, K), z(0, K, k, dt=np.int32), z(0, K, k), z(0, K), z(0, K),
            z(0, K, dt=np.bool_), z(0, dt=np.uint8), z(0, dt=np.uint8),
        )

    def select(self, idx: np.ndarray) -> Blocks:
        return Blocks(**{f: getattr(self, f)[idx] for f in self.FIELDS})


@dataclass
class ExperienceRecord:
    prompt_id: str
    token_ids: np.ndarray  # [n] int32 prompt + committed answer
    prompt_len: int
    blocks: Blocks
    features: torch.Tensor | None = None  # [n-1, F] target features of positions 0..n-2 (None if not needed)
    actor_id: int = 0
    incarnation: int = 0  # the actor's restart count: (actor_id, incarnation, seq_no) is unique
    seq_no: int = 0
    policy_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # the target's top-k (+ tail) for token t+1 at every position t (0..n-2), when the recipe trains on every
    # response position (EAGLE-3's training-time test); None otherwise
    teacher_topk_ids: np.ndarray | None = None  # [n-1, k] int32
    teacher_topk_probs: np.ndarray | None = None  # [n-1, k] float32
    teacher_tail: np.ndarray | None = None  # [n-1] float32

    @property
    def uid(self) -> tuple[int, int, int]:
        return (self.actor_id, self.incarnation, self.seq_no)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def as_teacher(self) -> TeacherRecord:
        """The sequence as teacher-forced SFT data (needs the per-position teacher arrays)."""
        if self.teacher_topk_ids is None or self.features is None:
            raise RecordError(f"record {self.uid} carries no per-position teacher top-k (the recipe needs loss.response=ttt data)")
        return TeacherRecord(
            self.prompt_id, self.token_ids, self.prompt_len, self.features, self.teacher_topk_ids,
            self.teacher_topk_probs, self.teacher_tail,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# codec


def _pack_array(a) -> dict:
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu().contiguous()
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(t.dtype)
        if name is None:
            raise RecordError(f"cannot encode a tensor of dtype {t.dtype}")
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        return {"t": name, "s": list(t.shape), "b": raw}
    a = np.ascontiguousarray(a)
    name = a.dtype.name
    if name not in _NP_DTYPES:
        raise RecordError(f"cannot encode an array of dtype {name}")
    return {"d": name, "s": list(a.shape), "b": a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()}


def _unpack_array(obj: Any, what: str, max_elems: int):
    if not isinstance(obj, dict) or "b" not in obj or "s" not in obj:
        raise RecordError(f"malformed record: field '{what}' is not an encoded array")
    shape = obj["s"]
    if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape) or len(shape) > 4:
        raise RecordError(f"malformed record: field '{what}' has an invalid shape {shape!r}")
    count = int(np.prod(shape)) if shape else 1
    if count > max_elems:
        raise RecordError(f"malformed record: field '{what}' claims {count} elements (limit {max_elems})")
    raw = obj["b"]
    if not isinstance(raw, bytes):
        raise RecordError(f"malformed record: field '{what}' data is not bytes")
    if "t" in obj:
        name = obj["t"]
        if name not in _TORCH_DTYPES:
            raise RecordError(f"malformed record: field '{what}' has unknown dtype {name!r}")
        itemsize = 2 if name in ("bfloat16", "float16") else 4
        if len(raw) != count * itemsize:
            raise RecordError(f"malformed record: field '{what}' has {len(raw)} bytes, expected {count * itemsize}")
        if name == "bfloat16":
            return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).reshape(shape) if count else torch.zeros(shape, dtype=torch.bfloat16)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(_NP_DTYPES[name]).newbyteorder("<")).astype(_NP_DTYPES[name]).reshape(shape))
    name = obj.get("d")
    if name not in _NP_DTYPES:
        raise RecordError(f"malformed record: field '{what}' has unknown dtype {name!r}")
    dt = np.dtype(_NP_DTYPES[name]).newbyteorder("<")
    if len(raw) != count * dt.itemsize:
        raise RecordError(f"malformed record: field '{what}' has {len(raw)} bytes, expected {count * dt.itemsize}")
    return np.frombuffer(raw, dtype=dt).astype(_NP_DTYPES[name]).reshape(shape)


def encode_record(rec: ExperienceRecord, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    validate_record(rec)
    msg = {
        "kind": KIND,
        "schema": SCHEMA_VERSION,
        "prompt_id": rec.prompt_id,
        "prompt_len": int(rec.prompt_len),
        "actor_id": int(rec.actor_id),
        "incarnation": int(rec.incarnation),
        "seq_no": int(rec.seq_no),
        "policy_version": int(rec.policy_version),
        "meta": rec.meta,
        "token_ids": _pack_array(np.asarray(rec.token_ids, dtype=np.int32)),
        "features": None if rec.features is None else _pack_array(rec.features),
        "blocks": {f: _pack_array(getattr(rec.blocks, f)) for f in Blocks.FIELDS},
        "teacher": None if rec.teacher_topk_ids is None else {f: _pack_array(getattr(rec, f"teacher_{f}")) for f in _TEACHER},
    }
    data = msgpack.packb(msg, use_bin_type=True)
    if len(data) > max_bytes:
        raise RecordError(f"record of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    return data


def decode_record(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ExperienceRecord:
    """Bytes -> record, or RecordError saying what is wrong with the bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"a record must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RecordError(f"record of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) == 0:
        raise RecordError("empty record bytes")
    try:
        msg = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=1 << 20,
            max_array_len=1 << 16, max_map_len=1 << 12,
        )  # fmt: skip
    except msgpack.ExtraData:
        raise RecordError("malformed record: trailing bytes after the message") from None
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise RecordError(f"malformed record: not a complete msgpack message ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict) or msg.get("kind") != KIND:
        raise RecordError("malformed record: not a dopd experience record")
    if msg.get("schema") != SCHEMA_VERSION:
        raise RecordError(f"record schema {msg.get('schema')!r} is not supported (this dopd reads {SCHEMA_VERSION})")
    limit = max_bytes
    try:
        blocks_raw = msg["blocks"]
        if not isinstance(blocks_raw, dict) or set(blocks_raw) != set(Blocks.FIELDS):
            raise RecordError("malformed record: blocks must hold exactly " + ", ".join(Blocks.FIELDS))
        blocks = Blocks(**{f: _unpack_array(blocks_raw[f], f"blocks.{f}", limit) for f in Blocks.FIELDS})
        feats = msg["features"]
        teacher = msg.get("teacher")
        if teacher is not None and (not isinstance(teacher, dict) or set(teacher) != set(_TEACHER)):
            raise RecordError("malformed record: teacher must hold exactly " + ", ".join(_TEACHER))
        tch = {f"teacher_{f}": _unpack_array(teacher[f], f"teacher.{f}", limit) for f in _TEACHER} if teacher else {}
        rec = ExperienceRecord(
            prompt_id=str(msg["prompt_id"]),
            token_ids=_unpack_array(msg["token_ids"], "token_ids", limit),
            prompt_len=int(msg["prompt_len"]),
            blocks=blocks,
            features=None if feats is None else _unpack_array(feats, "features", limit),
            actor_id=int(msg["actor_id"]),
            incarnation=int(msg["incarnation"]),
            seq_no=int(msg["seq_no"]),
            policy_version=int(msg["policy_version"]),
            meta=dict(msg.get("meta") or {}),
            **tch,
        )
    except KeyError as e:
        raise RecordError(f"malformed record: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise RecordError(f"malformed record: {e}") from None
    validate_record(rec)
    return rec


def validate_record(rec: ExperienceRecord) -> None:
    """Shape, dtype and range checks shared by encode (catch actor bugs) and decode (catch bad bytes)."""
    t = rec.token_ids
    if not isinstance(t, np.ndarray) or t.ndim != 1 or t.dtype.kind != "i":
        raise RecordError("malformed record: token_ids must be a 1-D integer array")
    n = t.shape[0]
    if not 1 <= rec.prompt_len <= n:
        raise RecordError(f"malformed record: prompt_len {rec.prompt_len} outside 1..{n}")
    if (t < 0).any():
        raise RecordError("malformed record: negative token id")
    b = rec.blocks
    M = b.anchor.shape[0]
    if b.draft_tokens.ndim != 2 or b.draft_tokens.shape[0] != M:
        raise RecordError("malformed record: blocks.draft_tokens must be [M, K]")
    K = b.draft_tokens.shape[1]
    if b.target_topk_ids.ndim != 3 or b.target_topk_ids.shape[:2] != (M, K):
        raise RecordError("malformed record: blocks.target_topk_ids must be [M, K, k]")
    k = b.target_topk_ids.shape[2]
    want = {
        "anchor": ((M,), "i"), "draft_tokens": ((M, K), "i"), "draft_logprobs": ((M, K), "f"),
        "target_topk_ids": ((M, K, k), "i"), "target_topk_probs": ((M, K, k), "f"), "target_tail": ((M, K), "f"),
        "target_draft_prob": ((M, K), "f"), "accept_mask": ((M, K), "b"), "source": ((M,), "u"), "streams": ((M,), "u"),
    }  # fmt: skip
    for f, (shape, kind) in want.items():
        a = getattr(b, f)
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype.kind != kind:
            got = (a.shape, a.dtype.kind) if isinstance(a, np.ndarray) else type(a).__name__
            raise RecordError(f"malformed record: blocks.{f} must be {shape} of kind '{kind}', got {got}")
    if M and (b.anchor.min() < 1 or b.anchor.max() > n):
        raise RecordError(f"malformed record: block anchors must be within 1..{n}")
    if M and not np.isin(b.source, list(SOURCES.values())).all():
        raise RecordError("malformed record: unknown block source")
    if M and ((b.streams == 0) | (b.streams > STREAM_BOTH)).any():
        raise RecordError("malformed record: blocks.streams must be 1 (accepted), 2 (rejected) or 3 (both)")
    if rec.teacher_topk_ids is not None:
        ti, tp, tt = rec.teacher_topk_ids, rec.teacher_topk_probs, rec.teacher_tail
        if not (isinstance(ti, np.ndarray) and isinstance(tp, np.ndarray) and isinstance(tt, np.ndarray)):
            raise RecordError("malformed record: teacher arrays must all be present")
        if ti.ndim != 2 or ti.shape[0] != n - 1 or tp.shape != ti.shape or tt.shape != (n - 1,) or ti.dtype.kind != "i":
            raise RecordError(f"malformed record: teacher top-k must be [{n - 1}, k] ids and probs and a [{n - 1}] tail")
        if not (np.isfinite(tp).all() and np.isfinite(tt).all()):
            raise RecordError("malformed record: teacher probabilities hold NaN or inf")
    if rec.features is not None:
        f = rec.features
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != n - 1:
            raise RecordError(f"malformed record: features must be [{n - 1}, F] (one row per position but the last)")
        if not torch.isfinite(f.float()).all():
            raise RecordError("malformed record: features hold NaN or inf")
    for f in ("draft_logprobs", "target_topk_probs", "target_tail", "target_draft_prob"):
        if not np.isfinite(getattr(b, f)).all():
            raise RecordError(f"malformed record: blocks.{f} holds NaN or inf")


# ---------------------------------------------------------------------------------------------------------------
# teacher-forced sequences (SFT data)

TEACHER_KIND = "dopd.teacher"


@dataclass
class TeacherRecord:
    """A target-written sequence scored by the target itself (teacher forcing): the SFT baselines' data.

    Position t (0..n-2) holds the target's features and its top-k distribution for token t+1 given x_0..x_t.
    """

    prompt_id: str
    token_ids: np.ndarray  # [n] int32
    prompt_len: int
    features: torch.Tensor  # [n-1, F]
    topk_ids: np.ndarray  # [n-1, k] int32
    topk_probs: np.ndarray  # [n-1, k] float32
    tail: np.ndarray  # [n-1] float32

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def encode_teacher(rec: TeacherRecord) -> bytes:
    n = rec.token_ids.shape[0]
    if rec.features.shape[0] != n - 1 or rec.topk_ids.shape[0] != n - 1:
        raise RecordError("teacher record: features and top-k must have one row per position but the last")
    msg = {
        "kind": TEACHER_KIND,
        "schema": SCHEMA_VERSION,
        "prompt_id": rec.prompt_id,
        "prompt_len": int(rec.prompt_len),
        **{f: _pack_array(getattr(rec, f)) for f in ("token_ids", "features", "topk_ids", "topk_probs", "tail")},
    }
    return msgpack.packb(msg, use_bin_type=True)


def decode_teacher(data: bytes, max_bytes: int = 1 << 30) -> TeacherRecord:
    try:
        msg = msgpack.unpackb(bytes(data), raw=False, max_bin_len=max_bytes)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise RecordError(f"malformed teacher record ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict) or msg.get("kind") != TEACHER_KIND or msg.get("schema") != SCHEMA_VERSION:
        raise RecordError("not a dopd teacher record of this schema version")
    try:
        arrays = {f: _unpack_array(msg[f], f, max_bytes) for f in ("token_ids", "features", "topk_ids", "topk_probs", "tail")}
        return TeacherRecord(prompt_id=str(msg["prompt_id"]), prompt_len=int(msg["prompt_len"]), **arrays)
    except KeyError as e:
        raise RecordError(f"malformed teacher record: missing field {e}") from None
