"""Exactly-once accounting with bounded state: which records were trained, per (actor, incarnation) sequence runs.

Every record carries (actor, incarnation, seq), and an incarnation numbers its records 0, 1, 2, ... So instead of
the id of every trained record, the driver keeps per incarnation a `floor` (every seq below it is settled) and the
sorted runs [start, end) of seqs seen above it. In-order delivery keeps zero runs (the floor just moves up);
out-of-order delivery (an actor feeding several shards read by different ranks) or records dropped on the way
(stale, full) leave a few runs. A run more than `window` seqs below the newest seq is folded into the floor: the
gap before it is a record that was dropped, since no record can still be in flight that far back while the queue
holds fewer than `window` records of one incarnation. So the state is O(incarnations + gaps within the last
`window` seqs), independent of how many records were trained.

The guarantee is unchanged where it matters: a record delivered twice is always counted (a seq at or below the
floor, or inside a run, is a duplicate). The one approximation errs the safe way: a record arriving more than
`window` seqs late would be counted as trained twice, never missed.
"""

from __future__ import annotations

from bisect import bisect_right

DEFAULT_WINDOW = 8192


class TrainedLedger:
    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self.keys: dict[tuple[int, int], list] = {}  # (actor, incarnation) -> [floor, starts, ends]

    def add(self, uid) -> bool:
        """Record one trained uid (actor, incarnation, seq); True if it was new, False for a duplicate."""
        actor, inc, seq = (int(x) for x in uid)
        entry = self.keys.get((actor, inc))
        if entry is None:
            entry = self.keys[(actor, inc)] = [0, [], []]  # seqs start at 0; early drops fold in after `window`
        floor, starts, ends = entry
        if seq < floor:
            return False
        i = bisect_right(starts, seq) - 1
        if i >= 0 and seq < ends[i]:
            return False
        # insert [seq, seq + 1), merging with the run before (ends at seq) and after (starts at seq + 1)
        joins_prev = i >= 0 and ends[i] == seq
        joins_next = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if joins_prev and joins_next:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_prev:
            ends[i] = seq + 1
        elif joins_next:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq + 1)
        self._compact(entry)
        return True

    def __contains__(self, uid) -> bool:
        """Whether this uid was added already (what `add` would answer False for)."""
        actor, inc, seq = (int(x) for x in uid)
        entry = self.keys.get((actor, inc))
        if entry is None:
            return False
        floor, starts, ends = entry
        i = bisect_right(starts, seq) - 1
        return seq < floor or (i >= 0 and seq < ends[i])

    def _compact(self, entry: list) -> None:
        floor, starts, ends = entry
        if starts and starts[0] == floor:  # contiguous from the floor: move the floor up
            floor = ends[0]
            del starts[0], ends[0]
        limit = (ends[-1] if ends else floor) - self.window
        while starts and starts[0] <= limit:  # gaps this far back are drops, not records still in flight
            floor = ends[0]
            del starts[0], ends[0]
        entry[0] = floor

    def __len__(self) -> int:
        return len(self.keys)

    def runs(self) -> int:
        return sum(len(e[1]) for e in self.keys.values())

    def to_json(self) -> list:
        """Compact form for checkpoints: [[actor, incarnation, floor, [start, end, start, end, ...]], ...]."""
        return [[a, i, e[0], [x for se in zip(e[1], e[2]) for x in se]] for (a, i), e in sorted(self.keys.items())]

    @classmethod
    def from_json(cls, rows: list, window: int = DEFAULT_WINDOW) -> TrainedLedger:
        led = cls(window)
        for a, i, floor, flat in rows:
            led.keys[(int(a), int(i))] = [int(floor), [int(x) for x in flat[0::2]], [int(x) for x in flat[1::2]]]
        return led
