"""One shard of the experience queue: byte-bounded, with backpressure, staleness dropping and accounting.

Records arrive as wire bytes (common/record.py). A shard decodes and validates each one on `put`, so malformed
bytes are rejected and counted there and can never crash a learner. When a shard is full the configured policy
decides: `block` (the producer is told "full" and retries later: backpressure), `drop_oldest` or `drop_newest`.
`get` hands a learner rank up to n records, first dropping (and counting) those more than `max_staleness`
policy versions behind the learner. Each learner rank reads its own shard(s), so ranks never compete for
records and each gets full micro-batches. The class is plain Python; the distributed job wraps it in a Ray actor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from .errors import RecordError
from .record import decode_record

OK, FULL, REJECTED, DROPPED = "ok", "full", "rejected", "dropped"


@dataclass
class ShardStats:
    shard: int
    depth: int = 0
    bytes: int = 0
    accepted: int = 0
    rejected: int = 0
    dropped_stale: int = 0
    dropped_full: int = 0
    delivered: int = 0
    refused_full: int = 0  # puts answered "full" under the block policy (backpressure events)
    peak_bytes: int = 0  # the most bytes ever held: the bound holds if this never exceeds max_bytes
    last_error: str = ""


class QueueShard:
    def __init__(self, shard_id: int, max_bytes: int, policy: str = "block", max_staleness: int = 4, max_record_bytes: int = 64 * 2**20):
        if policy not in ("block", "drop_oldest", "drop_newest"):
            raise ValueError(f"unknown queue policy '{policy}'")
        self.max_bytes, self.policy, self.max_staleness, self.max_record_bytes = max_bytes, policy, max_staleness, max_record_bytes
        self.items: deque[tuple[bytes, int]] = deque()  # (record bytes, policy version)
        self.stats = ShardStats(shard=shard_id)

    def put(self, data: bytes) -> str:
        """Enqueue one record's bytes: "ok", "full" (retry later), "dropped" (a drop policy) or "rejected"."""
        try:
            rec = decode_record(data, max_bytes=self.max_record_bytes)
        except RecordError as e:
            self.stats.rejected += 1
            self.stats.last_error = str(e)[:300]
            return REJECTED
        size = len(data)
        if size > self.max_bytes:
            self.stats.rejected += 1
            self.stats.last_error = f"record of {size} bytes is larger than the whole shard ({self.max_bytes})"
            return REJECTED
        if self.stats.bytes + size > self.max_bytes:
            if self.policy == "block":
                self.stats.refused_full += 1
                return FULL
            if self.policy == "drop_newest":
                self.stats.dropped_full += 1
                return DROPPED
            while self.items and self.stats.bytes + size > self.max_bytes:
                old, _ = self.items.popleft()
                self.stats.bytes -= len(old)
                self.stats.dropped_full += 1
        self.items.append((bytes(data), rec.policy_version))
        self.stats.bytes += size
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)
        self.stats.accepted += 1
        self.stats.depth = len(self.items)
        return OK

    def get(self, n: int, learner_version: int) -> list[bytes]:
        """Pop up to n records no more than max_staleness versions behind `learner_version`."""
        out = []
        while self.items and len(out) < n:
            data, version = self.items.popleft()
            self.stats.bytes -= len(data)
            if learner_version - version > self.max_staleness:
                self.stats.dropped_stale += 1
                continue
            out.append(data)
        self.stats.delivered += len(out)
        self.stats.depth = len(self.items)
        return out

    def get_stats(self) -> dict:
        self.stats.depth = len(self.items)
        return asdict(self.stats)
