"""The exactly-once ledger: bounded state, out-of-order delivery, every duplicate caught, checkpoint round trip."""

from __future__ import annotations

import json
import random

from dopd.exactly_once import TrainedLedger


def deliver(n_records: int, n_inc: int, drop: float, shuffle_block: int, seed: int = 0):
    """uids as learners would see them: incarnations interleaved, out of order inside blocks, some dropped."""
    rng = random.Random(seed)
    per = n_records // n_inc
    streams = []
    for inc in range(n_inc):
        seqs = [s for s in range(per) if rng.random() >= drop]
        out = []
        for b in range(0, len(seqs), shuffle_block):
            blk = seqs[b : b + shuffle_block]
            rng.shuffle(blk)
            out += blk
        streams.append([(inc % 4, 1000 + inc, s) for s in out])
    pos = [0] * n_inc
    while True:  # round-robin over incarnations, a few at a time (actors feeding shards concurrently)
        live = [i for i in range(n_inc) if pos[i] < len(streams[i])]
        if not live:
            return
        for i in live:
            k = rng.randint(1, 8)
            yield from streams[i][pos[i] : pos[i] + k]
            pos[i] += k


def test_a_million_records_from_64_incarnations_stay_under_100kb_and_a_duplicate_is_caught():
    led = TrainedLedger()
    n = 0
    for uid in deliver(10**6, 64, drop=0.002, shuffle_block=64):
        assert led.add(uid), f"{uid} is new but was reported as a duplicate"
        n += 1
        last = uid
    assert n > 990_000
    size = len(json.dumps(led.to_json()))
    assert size < 100_000, f"exactly-once state is {size} bytes"
    # duplicates: an old record (long folded into the floor), a recent one, the newest
    assert not led.add((0, 1000, 5))
    assert not led.add((1, 1001, 15_000))
    assert not led.add(last)
    # the same after a checkpoint round trip
    back = TrainedLedger.from_json(json.loads(json.dumps(led.to_json())))
    assert back.to_json() == led.to_json()
    assert not back.add((0, 1000, 5)) and back.add((0, 1000, 10**7)) and not back.add((0, 1000, 10**7))


def test_state_does_not_grow_with_records_trained():
    small, big = TrainedLedger(), TrainedLedger()
    for uid in deliver(10**5, 8, drop=0.001, shuffle_block=32, seed=1):
        small.add(uid)
    for uid in deliver(10**6, 8, drop=0.001, shuffle_block=32, seed=1):
        big.add(uid)
    s, b = len(json.dumps(small.to_json())), len(json.dumps(big.to_json()))
    assert b < 2 * s + 2000, (s, b)  # 10x the records, about the same state (gaps within the window only)


def test_out_of_order_is_not_a_duplicate_and_every_repeat_is():
    led = TrainedLedger(window=16)
    order = [3, 0, 2, 1, 7, 5, 4, 6]
    assert all(led.add((0, 1, s)) for s in order)
    assert led.runs() == 0 and led.keys[(0, 1)][0] == 8  # contiguous 0..7: just a floor
    assert all(not led.add((0, 1, s)) for s in order)
    assert led.add((0, 2, 0))  # another incarnation: its own numbering
    # a gap (a dropped record) stays open inside the window, then folds into the floor
    assert led.add((0, 1, 9)) and led.runs() == 1
    assert led.add((0, 1, 8))  # the "gap" was only late: still accepted inside the window
    for s in range(11, 40):
        led.add((0, 1, s))
    assert led.runs() == 0 and not led.add((0, 1, 10))  # 30 seqs late: outside the window, counted (the safe way)
