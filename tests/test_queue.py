"""Queue shard: backpressure, drop policies, staleness dropping, rejection of malformed bytes."""

from __future__ import annotations

from test_record import make_record

from dopd.common.queue import QueueShard
from dopd.common.record import encode_record


def rec_bytes(version=0, seq=0):
    r = make_record(seed=seq)
    r.policy_version, r.seq_no = version, seq
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
    for v in (0, 1, 3, 5):
        q.put(rec_bytes(version=v))
    got = q.get(10, learner_version=5)
    assert len(got) == 2 and q.get_stats()["dropped_stale"] == 2  # versions 0 and 1 are > 2 behind
    assert q.put(b"garbage") == "rejected" and q.put(rec_bytes()[:-5]) == "rejected"
    s = q.get_stats()
    assert s["rejected"] == 2 and "malformed" in s["last_error"]
