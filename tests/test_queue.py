"""Queue shard: backpressure, drop policies, staleness dropping, de-duplication, rejection of bad headers, and
waiting puts/gets (no sleep-polling)."""

from __future__ import annotations

import threading
import time

from test_record import make_record

from dopd.common.record import HEADER, encode_record
from dopd.queue import QueueShard


def rec_bytes(version=0, seq=0, actor=3, incarnation=77):
    r = make_record(seed=seq)
    r.policy_version, r.seq_no, r.actor_id, r.incarnation = version, seq, actor, incarnation
    return encode_record(r)


def test_block_policy_backpressure():
    one = len(rec_bytes())
    q = QueueShard(0, max_bytes=int(one * 2.5), policy="block")
    assert [q.put(rec_bytes(seq=i)) for i in range(3)] == ["ok", "ok", "full"]
    assert q.get(1, learner_version=0) and q.put(rec_bytes(seq=9)) == "ok"
    s = q.get_stats()
    assert s["refused_full"] == 1 and s["depth"] == 2 and s["accepted"] == 3


def test_drop_policies():
    one = len(rec_bytes())
    q = QueueShard(0, max_bytes=int(one * 2.5), policy="drop_oldest")
    for i in range(4):
        assert q.put(rec_bytes(seq=i)) == "ok"
    assert q.get_stats()["dropped_full"] == 2 and len(q.get(10, 0)) == 2
    q = QueueShard(0, max_bytes=int(one * 2.5), policy="drop_newest")
    assert [q.put(rec_bytes(seq=i)) for i in range(3)] == ["ok", "ok", "dropped"]


def test_staleness_and_rejection():
    q = QueueShard(0, max_bytes=10**9, max_staleness=2)
    for i, v in enumerate((0, 1, 3, 5)):
        assert q.put(rec_bytes(version=v, seq=i)) == "ok"
    got = q.get(10, learner_version=5)
    assert len(got) == 2 and q.get_stats()["dropped_stale"] == 2  # versions 0 and 1 are > 2 behind
    assert q.put(b"garbage") == "rejected" and q.put(rec_bytes()[:-5]) == "rejected"
    s = q.get_stats()
    assert s["rejected"] == 2 and "malformed" in s["last_error"]


def test_every_bad_input_is_rejected_and_counted_never_raised():
    q = QueueShard(0, max_bytes=10**9, max_record_bytes=10**6)
    good = rec_bytes()
    bad = [
        None, 17, "text", [good], b"", good[: HEADER.size - 1], good[:-1], good + b"\x00",
        memoryview(good[: len(good) // 4 * 4]).cast("I"), memoryview(good)[::2], b"\x00" * (10**6 + 1),
    ]  # fmt: skip
    assert [q.put(x) for x in bad] == ["rejected"] * len(bad)
    assert q.put_many("not a list") == ["rejected"]  # type: ignore[arg-type]
    s = q.get_stats()
    assert s["rejected"] == len(bad) + 1 and s["accepted"] == 0 and s["depth"] == 0


def test_a_duplicate_id_is_refused_even_after_it_was_consumed():
    q = QueueShard(0, max_bytes=10**9)
    data = rec_bytes(seq=4)
    assert q.put(data) == "ok" and q.get(1, 0) == [data]  # consumed
    assert q.put(data) == "rejected"  # re-put of a consumed record
    replay = rec_bytes(seq=4)  # a restarted actor that replays its sequence numbers: same id, new bytes
    assert q.put_many([replay, rec_bytes(seq=5)]) == ["rejected", "ok"]
    assert q.put(rec_bytes(seq=4, incarnation=78)) == "ok"  # a new incarnation's seq 4 is another record
    s = q.get_stats()
    assert s["duplicates"] == 2 and s["rejected"] == 2 and "duplicate record (3, 77, 4)" in s["last_error"]


def test_learner_refusals_move_records_from_accepted_to_rejected():
    q = QueueShard(0, max_bytes=10**9)
    assert q.put_many([rec_bytes(seq=i) for i in range(3)]) == ["ok"] * 3
    assert len(q.get(3, 0)) == 3
    q.refused_by_learner(["malformed record: blocks.target_tail holds NaN or inf"])
    s = q.get_stats()
    assert (s["accepted"], s["delivered"], s["rejected"], s["rejected_at_learner"]) == (2, 2, 1, 1)
    assert "target_tail" in s["last_error"]


def test_put_and_get_wait_inside_the_shard():
    """A full shard's put waits for a get to free room; a get waits for puts to arrive: no polling either side."""
    one = len(rec_bytes())
    q = QueueShard(0, max_bytes=int(one * 1.5), policy="block")
    assert q.put(rec_bytes(seq=0)) == "ok"
    threading.Timer(0.3, lambda: q.get(1, 0)).start()
    t0 = time.monotonic()
    assert q.put(rec_bytes(seq=1), wait_s=10) == "ok"
    assert 0.2 < time.monotonic() - t0 < 5  # woken by the get, not by its deadline
    assert q.put_many([rec_bytes(seq=i) for i in (2, 3, 4)]) == ["full"] * 3  # the first full one stops the batch
    assert q.get(1, 0)
    threading.Timer(0.3, lambda: q.put(rec_bytes(seq=5))).start()
    t0 = time.monotonic()
    assert len(q.get(1, 0, wait_s=10)) == 1 and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert q.get(1, 0, wait_s=0.2) == [] and time.monotonic() - t0 >= 0.2
