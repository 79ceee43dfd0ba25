"""One shard of the experience queue: byte-bounded, with backpressure, staleness dropping, de-duplication and accounting.

Records arrive as wire bytes (common/record.py). A shard reads only each record's 46-byte header: the framing, the
byte bound, the policy version it routes on, and the record's id, never its features: a record is decoded and
validated once, by the learner that trains on it, which reports the records it refuses back here
(`refused_by_learner`), so every bad input is counted as "rejected" in one place, at its shard. Any input whose
header or framing is bad is answered "rejected" and counted here; `put` raises for nothing.

Exactly once, before training: each id is accepted once. Actors route a record to a shard by its sequence number,
so an id always lands on the same shard, and the shard keeps the ids it accepted in a bounded ledger
(dopd/exactly_once.py): a re-put of a consumed record, or a restarted actor replaying its sequence numbers, is
refused as a duplicate (counted) instead of being trained again. The driver's own ledger then only confirms it.

When a shard is full the configured policy decides: `block` (the producer is told "full", or waits inside the put
up to `wait_s`: backpressure without sleep-polling), `drop_oldest` or `drop_newest`. `get` hands a learner rank up to
n records (waiting up to `wait_s` for them), first dropping (and counting) those more than `max_staleness` policy
versions behind the learner. Puts and gets take batches: one call per actor batch, one per learner micro-batch.
The class is plain Python and thread-safe; the distributed job makes it a threaded Ray actor (`RAY_OPTIONS`), so a
waiting get never blocks the puts that would satisfy it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

from dopd.common.errors import RecordError
from dopd.common.record import HEADER, read_header
from dopd.exactly_once import TrainedLedger

OK, FULL, REJECTED, DROPPED = "ok", "full", "rejected", "dropped"


@dataclass
class ShardStats:
    shard: int
    depth: int = 0
    bytes: int = 0
    accepted: int = 0  # records queued (less those the learner later refused: they move to `rejected`)
    rejected: int = 0  # bad header or framing, too big, duplicate, or refused by the learner's full validation
    duplicates: int = 0  # of `rejected`: ids this shard had already accepted
    rejected_at_learner: int = 0  # of `rejected`: refused by the learner's decode
    dropped_stale: int = 0
    dropped_full: int = 0
    delivered: int = 0  # records handed to a learner (less those it refused)
    refused_full: int = 0  # puts that found the shard full under the block policy (backpressure events)
    peak_bytes: int = 0  # the most bytes ever held: the bound holds if this never exceeds max_bytes
    last_error: str = ""


def _seconds(wait_s) -> float:
    """A wait bound: a bad one means no waiting, never an exception in a put."""
    return max(0.0, float(wait_s)) if isinstance(wait_s, (int, float)) and wait_s == wait_s else 0.0


class QueueShard:
    # a threaded Ray actor: puts, a waiting get and stats run at once (the shard only moves bytes: no CPU reserved)
    RAY_OPTIONS = {"num_cpus": 0, "max_concurrency": 16}

    def __init__(
        self,
        shard_id: int,
        max_bytes: int,
        policy: str = "block",
        max_staleness: int = 4,
        max_record_bytes: int = 64 * 2**20,
    ):
        if policy not in ("block", "drop_oldest", "drop_newest"):
            raise ValueError(f"unknown queue policy '{policy}'")
        self.max_bytes, self.policy, self.max_staleness, self.max_record_bytes = (
            max_bytes,
            policy,
            max_staleness,
            max_record_bytes,
        )
        self.items: deque[tuple[bytes, int]] = deque()  # (record bytes, policy version)
        self.stats = ShardStats(shard=shard_id)
        self.ledger = TrainedLedger()  # ids accepted here
        self.cv = threading.Condition()

    def _reject(self, error: str) -> str:
        self.stats.rejected += 1
        self.stats.last_error = error[:300]
        return REJECTED

    def _offer(self, data):
        """Check one record's header: (REJECTED, None) or ("", header)."""
        try:
            h = read_header(data, self.max_record_bytes)
        except RecordError as e:
            return self._reject(str(e)), None
        size = HEADER.size + h.body_bytes
        if size > self.max_bytes:
            return self._reject(f"record of {size} bytes is larger than the whole shard ({self.max_bytes})"), None
        if h.uid in self.ledger:
            self.stats.duplicates += 1
            return self._reject(f"duplicate record {h.uid} (actor, incarnation, seq): already accepted"), None
        return "", h

    def _enqueue(self, data: bytes, version: int, uid) -> str:
        size = len(data)
        if self.stats.bytes + size > self.max_bytes:
            if self.policy == "block":
                return FULL
            if self.policy == "drop_newest":
                self.stats.dropped_full += 1
                return DROPPED
            while self.items and self.stats.bytes + size > self.max_bytes:
                old, _ = self.items.popleft()
                self.stats.bytes -= len(old)
                self.stats.dropped_full += 1
        self.items.append((data, version))
        self.ledger.add(uid)
        self.stats.bytes += size
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)
        self.stats.accepted += 1
        self.stats.depth = len(self.items)
        self.cv.notify_all()
        return OK

    def put(self, data: bytes, wait_s: float = 0.0) -> str:
        """Enqueue one record's bytes: "ok", "full" (retry later), "dropped" (a drop policy) or "rejected"."""
        return self.put_many([data], wait_s)[0]

    def put_many(self, batch: list, wait_s: float = 0.0) -> list[str]:
        """Enqueue records in order, one answer each. Under the block policy a full shard is waited on for up to
        `wait_s` seconds in all; once one record finds it still full, it and the rest are answered "full"."""
        if not isinstance(batch, (list, tuple)):
            with self.cv:
                return [self._reject(f"put_many takes a list of records, got {type(batch).__name__}")]
        deadline = time.monotonic() + _seconds(wait_s)
        out: list[str] = []
        with self.cv:
            for i, data in enumerate(batch):
                res, h = self._offer(data)
                if res:
                    out.append(res)
                    continue
                raw = bytes(data)
                res = self._enqueue(raw, h.policy_version, h.uid)
                if res == FULL:
                    self.stats.refused_full += 1
                    while res == FULL and (left := deadline - time.monotonic()) > 0:
                        self.cv.wait(left)
                        res, h = self._offer(raw)  # the same id may have been accepted meanwhile
                        res = res or self._enqueue(raw, h.policy_version, h.uid)
                if res == FULL:
                    out += [FULL] * (len(batch) - i)
                    break
                out.append(res)
        return out

    def get(self, n: int, learner_version: int, wait_s: float = 0.0) -> list[bytes]:
        """Pop up to n records no more than max_staleness versions behind `learner_version`, waiting up to
        `wait_s` seconds for n of them to arrive."""
        deadline = time.monotonic() + _seconds(wait_s)
        out: list[bytes] = []
        with self.cv:
            while True:
                while self.items and len(out) < n:
                    data, version = self.items.popleft()
                    self.stats.bytes -= len(data)
                    if learner_version - version > self.max_staleness:
                        self.stats.dropped_stale += 1
                        continue
                    out.append(data)
                    self.stats.delivered += 1  # counted as it leaves: a crash meanwhile finds it in flight
                left = deadline - time.monotonic()
                if len(out) >= n or left <= 0:
                    break
                self.cv.notify_all()  # room freed for waiting puts
                self.cv.wait(left)
            self.stats.depth = len(self.items)
            self.cv.notify_all()
        return out

    def refused_by_learner(self, errors: list[str]) -> int:
        """Records this shard delivered that the learner's full validation refused: counted as rejected here."""
        with self.cv:
            k = len(errors)
            self.stats.rejected += k
            self.stats.rejected_at_learner += k
            self.stats.accepted -= k
            self.stats.delivered -= k
            if errors:
                self.stats.last_error = str(errors[-1])[:300]
            return k

    def get_stats(self) -> dict:
        with self.cv:
            self.stats.depth = len(self.items)
            return asdict(self.stats)
