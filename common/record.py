"""The experience record: what an actor sends and a learner trains on, and its wire format.

One record per rolled-out sequence: the committed tokens (prompt + answer), the target features the drafter
needs (bf16 by default), and its blocks: every verification step of the rollout and every replayed block, with
the draft tokens, the drafter's log-probs when it drafted them, the target's top-k distribution (+ tail mass) at
each block position, and the accept mask. Blocks are stored column-wise (arrays [M, K, ...]) so a record is a
handful of contiguous arrays, cheap to encode and to batch.

Wire format: a fixed 46-byte binary header (magic, kind, schema version, the record's id (actor, incarnation,
seq), its policy version, the body's size, and a CRC-32 of the header and body), then a msgpack body (a map;
arrays travel as {dtype, shape, raw little-endian bytes}; no pickle, so bytes from anywhere can be decoded safely).
The header is what lets a queue shard route, bound and de-duplicate a record by reading 46 bytes, without decoding
its features.

Where each check happens, so that every bad input ends as one counted `RecordError` and nothing else:
- `read_header` (the queue shard, on every put; O(1)): type and contiguity of the bytes, the byte bound, magic,
  kind, schema, non-negative ids, and that the body is exactly as long as the header says (truncation, trailing
  bytes). A shard answers "rejected" for anything it raises and counts it.
- `decode_record` / `decode_teacher` (the learner, once per record; also the prefill cache on disk): the header
  again, the CRC (damaged bytes), then a walk of the body against the schema: every map, key, string, shape and
  byte string is type- and size-checked BEFORE msgpack builds it, so the decoder never builds more than the
  schema's handful of objects (decoded memory is the arrays, i.e. proportional to the input: see
  bench/decode_memory.py); then `validate_record` / `validate_teacher`: shapes consistent with n, M, K, k, and the
  values that mean something (probabilities, log-probs, token ids, finite floats), as vectorised numpy checks.
  A learner reports what it refuses to the record's shard, where it is counted as rejected (learner/zero.py).
- `encode_record` checks the structure only (types, shapes, ids): enough to write a record that can decode, cheap
  on the actor; the values are checked once, where they are trained on.
Any exception that escapes these functions other than RecordError is a bug (tests/test_record_fuzz.py).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from .errors import RecordError

SCHEMA_VERSION = 3  # 3: a binary header (ids, version, size, CRC) before the msgpack body; typed `meta`
# (an optional trailing field, `hidden`, is written only when present: records and caches without it stay valid)
MAGIC = b"DOPD"
KIND_EXPERIENCE, KIND_TEACHER = 1, 2
_KIND_NAMES = {KIND_EXPERIENCE: "an experience", KIND_TEACHER: "a teacher"}
# magic, kind, schema, actor_id, incarnation, seq_no, policy_version, body bytes, body CRC-32 (little-endian)
HEADER = struct.Struct("<4sBBqqqqII")
_CRC_AT = HEADER.size - 4  # the CRC covers the header before it and the body
SOURCE_ROLLOUT, SOURCE_REPLAY, SOURCE_SHUFFLED = 0, 1, 2
SOURCES = {"rollout": SOURCE_ROLLOUT, "replay": SOURCE_REPLAY, "shuffled": SOURCE_SHUFFLED}
# which loss streams a block feeds (bit flags): the accepted stream (accepted positions + the first rejection,
# labelled by the target) and the rejected stream (drafted tokens from the first rejection on, scored by the target)
STREAM_ACC, STREAM_REJ = 1, 2
STREAM_BOTH = STREAM_ACC | STREAM_REJ
DEFAULT_MAX_BYTES = 64 * 2**20
TEACHER_MAX_BYTES = 2**30

# Limits the body is walked against (from the schema, not msgpack's defaults)
MAX_STR = 1 << 16  # prompt ids and meta strings; a string costs its length plus a constant, so this bounds nothing else
MAX_META_KEYS = 16  # `meta` is a flat map of str -> int | float | str | bool | None (what the actors put there)
MAX_DIMS = 4
# Value tolerances: a top-k + tail sum is 1 up to the rounding of a softmax (bf16: 2^-8 relative per probability,
# so under 0.4% on the sum); a log-probability is <= 0 up to float rounding
PROB_SUM_EPS = 1e-2
LOGPROB_EPS = 1e-4
_INT64_MAX = 2**63 - 1

_TEACHER = ("topk_ids", "topk_probs", "tail")
_NP_DTYPES = {
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float16": np.float16,
    "bool": np.bool_,
    "uint8": np.uint8,
}
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
            z(0, dt=np.int32),
            z(0, K, dt=np.int32),
            z(0, K),
            z(0, K, k, dt=np.int32),
            z(0, K, k),
            z(0, K),
            z(0, K),
            z(0, K, dt=np.bool_),
            z(0, dt=np.uint8),
            z(0, dt=np.uint8),
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
    meta: dict[str, Any] = field(default_factory=dict)  # flat: str -> int | float | str | bool | None
    # the target's top-k (+ tail) for token t+1 at every position t (0..n-2), when the recipe trains on every
    # response position (EAGLE-3's training-time test); None otherwise
    teacher_topk_ids: np.ndarray | None = None  # [n-1, k] int32
    teacher_topk_probs: np.ndarray | None = None  # [n-1, k] float32
    teacher_tail: np.ndarray | None = None  # [n-1] float32
    # the target's final normed hidden state (the LM head's input) at rows prompt_len-1 .. n-2, i.e. at every
    # position that predicts an answer token, on the target's own text; bf16. The learner applies the frozen head
    # it shares with the drafter: exact full-vocabulary targets (`loss.targets=full`, the replay-mismatch split)
    # for H values per position instead of V (docs/scale.md). None when the recipe needs neither
    target_hidden: torch.Tensor | None = None  # [n - prompt_len, H]

    @property
    def uid(self) -> tuple[int, int, int]:
        return (self.actor_id, self.incarnation, self.seq_no)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def as_teacher(self) -> TeacherRecord:
        """The sequence as teacher-forced SFT data (needs the per-position teacher arrays)."""
        if self.teacher_topk_ids is None or self.features is None:
            raise RecordError(
                f"record {self.uid} carries no per-position teacher top-k (the recipe needs loss.response=ttt data)"
            )
        return TeacherRecord(
            self.prompt_id, self.token_ids, self.prompt_len, self.features, self.teacher_topk_ids,
            self.teacher_topk_probs, self.teacher_tail, self.target_hidden,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the header: what a queue shard reads


@dataclass(frozen=True)
class Header:
    kind: int
    actor_id: int
    incarnation: int
    seq_no: int
    policy_version: int
    body_bytes: int
    crc32: int

    @property
    def uid(self) -> tuple[int, int, int]:
        return (self.actor_id, self.incarnation, self.seq_no)


def _byte_view(data: Any) -> memoryview:
    """The bytes as a flat byte view: a memoryview cast to wider items must not shrink len() below the size."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"a record must be bytes, got {type(data).__name__}")
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise RecordError("record bytes must be one contiguous buffer")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def read_header(data: Any, max_bytes: int = DEFAULT_MAX_BYTES, kind: int = KIND_EXPERIENCE) -> Header:
    """The 46-byte header, checked: framing and the byte bound, without reading the body."""
    mv = _byte_view(data)
    size = mv.nbytes
    if size > max_bytes:
        raise RecordError(f"record of {size} bytes exceeds the limit of {max_bytes} bytes")
    if size == 0:
        raise RecordError("empty record bytes")
    if size < HEADER.size:
        raise RecordError(f"malformed record: {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, k, schema, actor, inc, seq, version, body, crc = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise RecordError("malformed record: not a dopd record (bad magic)")
    if schema != SCHEMA_VERSION:
        raise RecordError(f"record schema {schema} is not supported (this dopd reads {SCHEMA_VERSION})")
    if k != kind:
        raise RecordError(
            f"malformed record: this is {_KIND_NAMES.get(k, f'a kind-{k}')} record, not {_KIND_NAMES[kind]} record"
        )
    for name, v in (("actor_id", actor), ("incarnation", inc), ("seq_no", seq), ("policy_version", version)):
        if v < 0:
            raise RecordError(f"malformed record: header field '{name}' is negative ({v})")
    if body != size - HEADER.size:
        what = "truncated" if body > size - HEADER.size else "trailing bytes after the message"
        raise RecordError(f"malformed record: {what} (the header says {body} body bytes, {size - HEADER.size} follow)")
    return Header(k, actor, inc, seq, version, body, crc)


def _frame(kind: int, body: bytes, ids: tuple[int, int, int, int], max_bytes: int) -> bytes:
    for name, v in zip(("actor_id", "incarnation", "seq_no", "policy_version"), ids):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= int(v) <= _INT64_MAX:
            raise RecordError(f"cannot encode: '{name}' must be an integer in 0..2^63-1, got {v!r}")
    size = HEADER.size + len(body)
    if size > max_bytes:
        raise RecordError(f"record of {size} bytes exceeds the limit of {max_bytes} bytes")
    head = HEADER.pack(MAGIC, kind, SCHEMA_VERSION, *(int(v) for v in ids), len(body), 0)[:_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def _body_of(data: Any, max_bytes: int, kind: int) -> tuple[Header, memoryview]:
    mv = _byte_view(data)
    h = read_header(mv, max_bytes, kind)
    body = mv[HEADER.size :]
    if zlib.crc32(body, zlib.crc32(mv[:_CRC_AT])) != h.crc32:
        raise RecordError("malformed record: the record fails its CRC-32 check (damaged bytes)")
    return h, body


# ---------------------------------------------------------------------------------------------------------------
# the body: msgpack, walked against the schema


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


_MAP = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ARRAY = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_STR = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # type byte -> width of its length
_INT = frozenset(range(0x00, 0x80)) | frozenset(range(0xE0, 0x100)) | frozenset(range(0xCC, 0xD4))
_FLOAT = frozenset({0xCA, 0xCB})
_NIL, _BOOL = 0xC0, frozenset({0xC2, 0xC3})
_SCALAR = _INT | _FLOAT | _STR | _BOOL | {_NIL}


class _Body:
    """A schema-driven walk over a msgpack body.

    Every value's type byte is looked at before msgpack reads it, and every map's and shape's length is checked
    against what the schema allows, so hostile msgpack (deep or wide containers, a container where a number
    belongs) is refused after a few bytes, and byte strings are sliced out of the input, not copied."""

    def __init__(self, body: memoryview, max_bin: int):
        self.buf = body
        self.where = "record"
        self.u = msgpack.Unpacker(
            raw=False, strict_map_key=True, max_buffer_size=max(1, body.nbytes), max_str_len=MAX_STR,
            max_bin_len=max_bin, max_array_len=MAX_DIMS, max_map_len=max(MAX_META_KEYS, len(Blocks.FIELDS)), max_ext_len=0,
        )  # fmt: skip
        self.u.feed(body)

    def fail(self, problem: str) -> RecordError:
        return RecordError(f"malformed record: field '{self.where}' {problem}")

    def peek(self) -> int:
        pos = self.u.tell()
        if pos >= self.buf.nbytes:
            raise self.fail("is missing: the body ends early (truncated)")
        return self.buf[pos]

    def scalar(self, allowed: frozenset, what: str):
        if self.peek() not in allowed:
            raise self.fail(f"must be {what}")
        return self.u.unpack()

    def int_(self) -> int:
        return self.scalar(_INT, "an integer")

    def str_(self) -> str:
        return self.scalar(_STR, "a string")

    def is_nil(self) -> bool:
        if self.peek() == _NIL:
            self.u.skip()
            return True
        return False

    def keys(self, allowed: tuple[str, ...], required: tuple[str, ...] = ()):
        """The keys of a map, each in `allowed`, none twice; the caller reads each key's value before the next."""
        where = self.where
        if self.peek() not in _MAP:
            raise self.fail("must be a map")
        n = self.u.read_map_header()
        if n > len(allowed):
            raise self.fail(f"has {n} entries (at most {len(allowed)})")
        seen = set()
        for _ in range(n):
            self.where = f"{where} key"
            k = self.str_()
            if k not in allowed or k in seen:
                raise RecordError(f"malformed record: {'duplicate' if k in seen else 'unknown'} field '{where}.{k}'")
            seen.add(k)
            self.where = k if where == "record" else f"{where}.{k}"
            yield k
        missing = [k for k in required if k not in seen]
        if missing:
            raise RecordError(
                f"malformed record: missing field '{missing[0] if where == 'record' else f'{where}.{missing[0]}'}'"
            )
        self.where = where

    def bin_(self) -> memoryview:
        b = self.peek()
        if b not in _BIN:
            raise self.fail("data must be bytes")
        pos, w = self.u.tell(), _BIN[b]
        if pos + 1 + w > self.buf.nbytes:
            raise self.fail("is truncated")
        n = int.from_bytes(self.buf[pos + 1 : pos + 1 + w], "big")
        self.u.skip()  # checks the length against max_bin_len and the end of the body
        return self.buf[pos + 1 + w : pos + 1 + w + n]

    def array(self, max_elems: int):
        where, got = self.where, {}
        for k in self.keys(("d", "t", "s", "b"), ("s", "b")):
            if k == "s":
                if self.peek() not in _ARRAY:
                    raise self.fail("must be a list of dimensions")
                nd = self.u.read_array_header()
                if nd > MAX_DIMS:
                    raise self.fail(f"has {nd} dimensions (at most {MAX_DIMS})")
                got["s"] = [self.int_() for _ in range(nd)]
            elif k == "b":
                got["b"] = self.bin_()
            else:
                got[k] = self.str_()
        self.where = where
        return _to_array(got, where, max_elems)

    def meta(self) -> dict:
        where, out = self.where, {}
        if self.peek() not in _MAP:
            raise self.fail("must be a map")
        n = self.u.read_map_header()
        if n > MAX_META_KEYS:
            raise self.fail(f"has {n} entries (at most {MAX_META_KEYS})")
        for _ in range(n):
            self.where = f"{where} key"
            k = self.str_()
            self.where = f"{where}.{k}"
            if k in out:
                raise self.fail("appears twice")
            v = self.scalar(_SCALAR, "a number, string, bool or nil")
            if isinstance(v, float) and not math.isfinite(v):
                raise self.fail("is not finite")
            out[k] = v
        self.where = where
        return out

    def end(self) -> None:
        if self.u.tell() != self.buf.nbytes:
            raise RecordError("malformed record: trailing bytes after the message body")


def _to_array(obj: dict, what: str, max_elems: int):
    has_np, has_t = "d" in obj, "t" in obj
    if has_np == has_t:
        raise RecordError(f"malformed record: field '{what}' must carry exactly one dtype ('d' or 't')")
    name = obj["t"] if has_t else obj["d"]
    table = _TORCH_DTYPES if has_t else _NP_DTYPES
    if name not in table:
        raise RecordError(f"malformed record: field '{what}' has unknown dtype {name!r}")
    shape = obj["s"]
    if any(d < 0 or d > max_elems for d in shape):
        raise RecordError(
            f"malformed record: field '{what}' has an invalid shape {shape!r} (each dimension 0..{max_elems})"
        )
    count = math.prod(shape)  # Python ints: no overflow
    if count > max_elems:
        raise RecordError(f"malformed record: field '{what}' claims {count} elements (limit {max_elems})")
    raw = obj["b"]
    itemsize = 2 if name in ("bfloat16", "float16") else np.dtype(_NP_DTYPES.get(name, np.float32)).itemsize
    if raw.nbytes != count * itemsize:
        raise RecordError(f"malformed record: field '{what}' has {raw.nbytes} bytes, expected {count * itemsize}")
    if name == "bfloat16":
        return torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.uint16).reshape(shape)).view(torch.bfloat16)
    dt = np.dtype(_NP_DTYPES[name])
    a = np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt).reshape(shape)  # a copy: it owns its memory
    return torch.from_numpy(a) if has_t else a


# ---------------------------------------------------------------------------------------------------------------
# experience records


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or len(meta) > MAX_META_KEYS:
        raise RecordError(f"cannot encode: meta must be a dict of at most {MAX_META_KEYS} entries")
    for k, v in meta.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (bool, int, float, str))):
            raise RecordError(
                f"cannot encode: meta.{k} must be a str key with an int, float, str, bool or None value, got {type(v).__name__}"
            )
        if isinstance(v, str) and len(v.encode()) > MAX_STR or isinstance(k, str) and len(k.encode()) > MAX_STR:
            raise RecordError(f"cannot encode: meta.{k} is longer than {MAX_STR} bytes")
        if isinstance(v, float) and not math.isfinite(v):
            raise RecordError(f"cannot encode: meta.{k} is not finite")


def encode_record(rec: ExperienceRecord, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Record -> bytes. Checks the structure (what makes bytes decodable); the values are the learner's to check."""
    check_structure(rec)
    _check_meta(rec.meta)
    msg = {
        "prompt_id": rec.prompt_id,
        "prompt_len": int(rec.prompt_len),
        "meta": rec.meta,
        "token_ids": _pack_array(np.asarray(rec.token_ids, dtype=np.int32)),
        "features": None if rec.features is None else _pack_array(rec.features),
        "blocks": {f: _pack_array(getattr(rec.blocks, f)) for f in Blocks.FIELDS},
        "teacher": None
        if rec.teacher_topk_ids is None
        else {f: _pack_array(getattr(rec, f"teacher_{f}")) for f in _TEACHER},
        **({} if rec.target_hidden is None else {"hidden": _pack_array(rec.target_hidden)}),
    }
    body = msgpack.packb(msg, use_bin_type=True)
    return _frame(KIND_EXPERIENCE, body, (rec.actor_id, rec.incarnation, rec.seq_no, rec.policy_version), max_bytes)


_RECORD_FIELDS = ("prompt_id", "prompt_len", "meta", "token_ids", "features", "blocks", "teacher", "hidden")


def decode_record(
    data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, vocab_size: int | None = None, hidden_size: int | None = None
) -> ExperienceRecord:
    """Bytes -> a fully validated record, or RecordError naming what is wrong with the bytes (and nothing else).

    `vocab_size`, when given (the learner gives its target's), bounds every token id; `hidden_size` (the target's)
    is the width the carried hidden states must have."""
    h, body = _body_of(data, max_bytes, KIND_EXPERIENCE)
    r = _Body(body, max_bytes)
    out: dict[str, Any] = {}
    try:
        for k in r.keys(_RECORD_FIELDS, _RECORD_FIELDS[:-1]):
            if k == "prompt_id":
                out[k] = r.str_()
            elif k == "prompt_len":
                out[k] = r.int_()
            elif k == "meta":
                out[k] = r.meta()
            elif k == "token_ids":
                out[k] = r.array(max_bytes)
            elif k in ("features", "hidden"):
                out[k] = None if r.is_nil() else r.array(max_bytes)
            elif k == "blocks":
                out[k] = Blocks(**{f: r.array(max_bytes) for f in r.keys(Blocks.FIELDS, Blocks.FIELDS)})
            elif k == "teacher":
                out[k] = (
                    None if r.is_nil() else {f"teacher_{f}": r.array(max_bytes) for f in r.keys(_TEACHER, _TEACHER)}
                )
        r.end()
    except (ValueError, msgpack.UnpackException) as e:  # what msgpack itself refuses (limits, truncation, utf-8)
        raise r.fail(f"does not decode ({type(e).__name__}: {str(e)[:120]})") from None
    del r  # its copy of the body: the arrays own their data from here on
    teacher = out.pop("teacher") or {}
    hidden = out.pop("hidden", None)
    rec = ExperienceRecord(
        actor_id=h.actor_id, incarnation=h.incarnation, seq_no=h.seq_no, policy_version=h.policy_version, **out, **teacher,
        target_hidden=hidden,
    )  # fmt: skip
    validate_record(rec, vocab_size, hidden_size)
    return rec


def _want(a: Any, what: str, shape: tuple, kind: str) -> None:
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype.kind != kind:
        got = (a.shape, a.dtype.kind) if isinstance(a, np.ndarray) else type(a).__name__
        raise RecordError(f"malformed record: {what} must be {shape} of kind '{kind}', got {got}")


def _is_count(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) <= _INT64_MAX


def check_structure(rec: ExperienceRecord) -> None:
    """Types, shapes and ids: O(1), what any record must satisfy to be encoded and batched."""
    if not isinstance(rec.prompt_id, str) or len(rec.prompt_id.encode()) > MAX_STR:
        raise RecordError(f"malformed record: prompt_id must be a string of at most {MAX_STR} bytes")
    t = rec.token_ids
    if not isinstance(t, np.ndarray) or t.ndim != 1 or t.dtype.kind != "i" or t.shape[0] < 1:
        raise RecordError("malformed record: token_ids must be a non-empty 1-D integer array")
    n = t.shape[0]
    if not _is_count(rec.prompt_len) or not 1 <= rec.prompt_len <= n:
        raise RecordError(f"malformed record: prompt_len {rec.prompt_len!r} outside 1..{n}")
    for name in ("actor_id", "incarnation", "seq_no", "policy_version"):
        if not _is_count(getattr(rec, name)):
            raise RecordError(f"malformed record: {name} must be an integer in 0..2^63-1, got {getattr(rec, name)!r}")
    b = rec.blocks
    if not isinstance(b, Blocks) or not isinstance(b.anchor, np.ndarray) or b.anchor.ndim != 1:
        raise RecordError("malformed record: blocks.anchor must be [M]")
    M = b.anchor.shape[0]
    if not isinstance(b.draft_tokens, np.ndarray) or b.draft_tokens.ndim != 2 or b.draft_tokens.shape[0] != M:
        raise RecordError("malformed record: blocks.draft_tokens must be [M, K]")
    K = b.draft_tokens.shape[1]
    if (
        not isinstance(b.target_topk_ids, np.ndarray)
        or b.target_topk_ids.ndim != 3
        or b.target_topk_ids.shape[:2] != (M, K)
    ):
        raise RecordError("malformed record: blocks.target_topk_ids must be [M, K, k]")
    k = b.target_topk_ids.shape[2]
    if K < 1 or k < 1:
        raise RecordError(f"malformed record: blocks need K >= 1 draft positions and a top-k of k >= 1 (K={K}, k={k})")
    want = {
        "anchor": ((M,), "i"), "draft_tokens": ((M, K), "i"), "draft_logprobs": ((M, K), "f"),
        "target_topk_ids": ((M, K, k), "i"), "target_topk_probs": ((M, K, k), "f"), "target_tail": ((M, K), "f"),
        "target_draft_prob": ((M, K), "f"), "accept_mask": ((M, K), "b"), "source": ((M,), "u"), "streams": ((M,), "u"),
    }  # fmt: skip
    for f, (shape, kind) in want.items():
        _want(getattr(b, f), f"blocks.{f}", shape, kind)
    if rec.teacher_topk_ids is not None or rec.teacher_topk_probs is not None or rec.teacher_tail is not None:
        ti = rec.teacher_topk_ids
        if not isinstance(ti, np.ndarray) or ti.ndim != 2 or ti.shape[0] != n - 1 or ti.shape[1] < 1:
            raise RecordError(
                f"malformed record: teacher top-k must be [{n - 1}, k] ids and probs and a [{n - 1}] tail"
            )
        _want(ti, "teacher.topk_ids", (n - 1, ti.shape[1]), "i")
        _want(rec.teacher_topk_probs, "teacher.topk_probs", ti.shape, "f")
        _want(rec.teacher_tail, "teacher.tail", (n - 1,), "f")
    if rec.features is not None:
        f = rec.features
        if (
            not isinstance(f, torch.Tensor)
            or f.ndim != 2
            or f.shape[0] != n - 1
            or f.dtype not in _TORCH_DTYPES.values()
        ):
            raise RecordError(
                f"malformed record: features must be [{n - 1}, F] (one row per position but the last) of bf16, fp16 or fp32"
            )
    if rec.target_hidden is not None:
        h, a = rec.target_hidden, n - rec.prompt_len
        if (
            not isinstance(h, torch.Tensor)
            or h.ndim != 2
            or h.shape[0] != a
            or h.shape[1] < 1
            or h.dtype not in _TORCH_DTYPES.values()
        ):
            got = (tuple(h.shape), str(h.dtype)) if isinstance(h, torch.Tensor) else type(h).__name__
            raise RecordError(
                f"malformed record: field 'hidden' must be [{a}, H] (one row per answer token) of bf16, fp16 or fp32, got {got}"
            )


_CHUNK = 1 << 20  # elements per vectorised step: temporaries stay a constant, not a multiple of the record


def _finite(a: np.ndarray | torch.Tensor) -> bool:
    """Vectorised finiteness; bf16/fp16 are checked on their bits (an all-ones exponent), with no float copy."""
    exp = None
    if isinstance(a, torch.Tensor):
        if a.dtype in (torch.bfloat16, torch.float16):
            exp = 0x7F80 if a.dtype == torch.bfloat16 else 0x7C00
            a = a.reshape(-1).view(torch.int16).numpy().view(np.uint16)
        else:
            a = a.numpy()
    flat = a.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        part = flat[i : i + _CHUNK]
        if (exp is not None and ((part & exp) == exp).any()) or (exp is None and not np.isfinite(part).all()):
            return False
    return True


def _ids_in_range(a: np.ndarray, what: str, vocab_size: int | None) -> None:
    if a.size and a.min() < 0:
        raise RecordError(f"malformed record: {what} holds negative token ids")
    if a.size and vocab_size is not None and a.max() >= vocab_size:
        raise RecordError(f"malformed record: {what} holds token ids outside the vocabulary (0..{vocab_size - 1})")


def _probabilities(p: np.ndarray, tail: np.ndarray, what: str) -> None:
    """Top-k probabilities and tail mass: finite, each in [0, 1], top-k + tail <= 1 + PROB_SUM_EPS."""
    if not (_finite(p) and _finite(tail)):
        raise RecordError(f"malformed record: {what} probabilities hold NaN or inf")
    if p.size and (p.min() < 0 or p.max() > 1) or tail.size and (tail.min() < 0 or tail.max() > 1):
        raise RecordError(f"malformed record: {what} probabilities outside [0, 1]")
    if p.size and (p.sum(-1, dtype=np.float64) + tail).max() > 1 + PROB_SUM_EPS:
        raise RecordError(f"malformed record: {what} top-k plus tail sums above 1")


def check_values(rec: ExperienceRecord, vocab_size: int | None = None, hidden_size: int | None = None) -> None:
    """The values that mean something, as vectorised checks (the structure is already checked)."""
    n = rec.num_tokens
    _ids_in_range(rec.token_ids, "token_ids", vocab_size)
    b = rec.blocks
    if len(b):
        if b.anchor.min() < 1 or b.anchor.max() > n:
            raise RecordError(f"malformed record: block anchors must be within 1..{n}")
        if not np.isin(b.source, list(SOURCES.values())).all():
            raise RecordError("malformed record: unknown block source")
        if ((b.streams == 0) | (b.streams > STREAM_BOTH)).any():
            raise RecordError("malformed record: blocks.streams must be 1 (accepted), 2 (rejected) or 3 (both)")
        _ids_in_range(b.draft_tokens, "blocks.draft_tokens", vocab_size)
        _ids_in_range(b.target_topk_ids, "blocks.target_topk_ids", vocab_size)
        if not _finite(b.draft_logprobs):
            raise RecordError("malformed record: blocks.draft_logprobs holds NaN or inf")
        if b.draft_logprobs.max() > LOGPROB_EPS:
            raise RecordError("malformed record: blocks.draft_logprobs holds log-probabilities above 0")
        _probabilities(b.target_topk_probs, b.target_tail, "blocks.target_topk")
        p = b.target_draft_prob
        if not _finite(p) or p.min() < 0 or p.max() > 1:
            raise RecordError("malformed record: blocks.target_draft_prob must be probabilities in [0, 1]")
    if rec.teacher_topk_ids is not None:
        _ids_in_range(rec.teacher_topk_ids, "teacher.topk_ids", vocab_size)
        _probabilities(rec.teacher_topk_probs, rec.teacher_tail, "teacher")
    if rec.features is not None and not _finite(rec.features):
        raise RecordError("malformed record: features hold NaN or inf")
    if rec.target_hidden is not None:
        if hidden_size is not None and rec.target_hidden.shape[1] != hidden_size:
            raise RecordError(
                f"malformed record: field 'hidden' has width {rec.target_hidden.shape[1]}, the target's hidden size is {hidden_size}"
            )
        if not _finite(rec.target_hidden):
            raise RecordError("malformed record: field 'hidden' holds NaN or inf")


def validate_record(rec: ExperienceRecord, vocab_size: int | None = None, hidden_size: int | None = None) -> None:
    """Structure and values: what a learner may train on."""
    check_structure(rec)
    check_values(rec, vocab_size, hidden_size)


# ---------------------------------------------------------------------------------------------------------------
# teacher-forced sequences (SFT data)


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
    # [n - prompt_len, H] the target's final hidden state (ExperienceRecord.target_hidden)
    hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


_TEACHER_FIELDS = ("prompt_id", "prompt_len", "token_ids", "features", "topk_ids", "topk_probs", "tail", "hidden")


def validate_teacher(rec: TeacherRecord, vocab_size: int | None = None, hidden_size: int | None = None) -> None:
    """A teacher record is the per-position half of an experience record: the same checks, minus the blocks."""
    if not isinstance(rec.features, torch.Tensor):
        raise RecordError("malformed teacher record: features are required")
    k = rec.topk_ids.shape[1] if isinstance(rec.topk_ids, np.ndarray) and rec.topk_ids.ndim == 2 else 1
    as_exp = ExperienceRecord(
        rec.prompt_id, rec.token_ids, rec.prompt_len, Blocks.empty(1, k), rec.features,
        teacher_topk_ids=rec.topk_ids, teacher_topk_probs=rec.topk_probs, teacher_tail=rec.tail, target_hidden=rec.hidden,
    )  # fmt: skip
    try:
        validate_record(as_exp, vocab_size, hidden_size)
    except RecordError as e:
        raise RecordError(str(e).replace("malformed record", "malformed teacher record", 1)) from None
    if as_exp.teacher_topk_ids is None:
        raise RecordError("malformed teacher record: the top-k arrays are required")


def encode_teacher(rec: TeacherRecord, max_bytes: int = TEACHER_MAX_BYTES) -> bytes:
    if not isinstance(rec.features, torch.Tensor) or not isinstance(rec.topk_ids, np.ndarray):
        raise RecordError("teacher record: features and top-k are required")
    n = rec.token_ids.shape[0]
    if rec.features.shape[0] != n - 1 or rec.topk_ids.shape[0] != n - 1:
        raise RecordError("teacher record: features and top-k must have one row per position but the last")
    msg = {
        "prompt_id": rec.prompt_id,
        "prompt_len": int(rec.prompt_len),
        **{f: _pack_array(getattr(rec, f)) for f in ("token_ids", "features", "topk_ids", "topk_probs", "tail")},
        **({} if rec.hidden is None else {"hidden": _pack_array(rec.hidden)}),
    }
    return _frame(KIND_TEACHER, msgpack.packb(msg, use_bin_type=True), (0, 0, 0, 0), max_bytes)


def decode_teacher(
    data: bytes, max_bytes: int = TEACHER_MAX_BYTES, vocab_size: int | None = None, hidden_size: int | None = None
) -> TeacherRecord:
    """Bytes (from an actor, or the prefill cache on disk) -> a validated TeacherRecord, or RecordError."""
    _, body = _body_of(data, max_bytes, KIND_TEACHER)
    r = _Body(body, max_bytes)
    out: dict[str, Any] = {}
    try:
        for k in r.keys(_TEACHER_FIELDS, _TEACHER_FIELDS[:-1]):
            if k == "hidden":
                out[k] = None if r.is_nil() else r.array(max_bytes)
            else:
                out[k] = r.str_() if k == "prompt_id" else r.int_() if k == "prompt_len" else r.array(max_bytes)
        r.end()
    except (ValueError, msgpack.UnpackException) as e:
        raise r.fail(f"does not decode ({type(e).__name__}: {str(e)[:120]})") from None
    del r
    rec = TeacherRecord(**out)
    validate_teacher(rec, vocab_size, hidden_size)
    return rec
