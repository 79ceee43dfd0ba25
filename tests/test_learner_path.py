"""The distributed runner's data path without Ray: a rollout worker's records -> a queue shard -> a DeepSpeed ZeRO-2
learner rank (world 1, gloo). What the tests claim to guard, by breaking it:
- a duplicate record (a re-put of a consumed record, a restarted actor replaying its sequence numbers) is refused
  at its shard and counted, never trained again, so the driver's ledger never sees it twice;
- a learner resumed from a checkpoint continues exactly like the run that was never interrupted (same losses, same
  weights), and a resume that restored only the weights (not the optimizer state) would not."""

from __future__ import annotations

import copy
import math
import socket

import numpy as np
import pytest
import torch

from dopd.common.load import load_config
from dopd.exactly_once import TrainedLedger
from dopd.queue import QueueShard

pytestmark = pytest.mark.heavy  # trains drafters: left out of the fast subset

BASE = [
    "model.target=tiny-random-llama", "data.prompts=champ-problems", "mode=opd", "drafter.kind=eagle3",
    "sft.num_prompts=8", "sft.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.batch_size=2",
    "learner.micro_batch_size=2", "learner.lr=3e-3", "learner.zero_stage=2", "cluster.learners=1", "metrics.port=0",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from dopd.actors.actor import RolloutWorker
    from dopd.common.record import encode_teacher
    from dopd.prompts import encode_all, load_prompt_set

    out = tmp_path_factory.mktemp("learner_path")
    cfg = load_config(None, BASE + [f"out_dir={out}"])
    prompts = load_prompt_set("champ-problems")[:8]
    ids, kept = encode_all(tiny.tokenizer, prompts, 256, drop_long=True)
    items = [(p.id, i) for p, i in zip(kept, ids)]
    worker = RolloutWorker(cfg, 0, items, incarnation=7, target=tiny)
    teacher = [encode_teacher(r) for r in worker.maker.teacher(worker.drafter.feature_layers, items[:4])]
    return cfg, worker, teacher, items, out


def new_rank(cfg, teacher):
    from dopd.learner.zero import make_rank

    rank = make_rank(cfg, 0, 1, "127.0.0.1", free_port())
    rank.set_teacher(teacher)
    return rank


def checkpoint_of(rank) -> tuple[dict, dict]:
    """What a checkpoint holds for the learner: its full weights and its training state (dopd/checkpoint.py)."""
    from dopd.learner.learner import merge_training_states

    return copy.deepcopy(rank.gather_weights()), merge_training_states([rank.training_state()])


def test_duplicates_through_the_real_path_are_refused_and_never_trained(setup, tiny):
    from dopd.actors.actor import RolloutWorker

    cfg, worker, teacher, items, _ = setup
    rank = new_rank(cfg, teacher)
    rank.sft_step()
    worker.set_weights(rank.gather_weights(), 1)
    shard = QueueShard(0, max_bytes=2**30)
    ledger = TrainedLedger()  # the driver's
    trained = []

    def train_what_the_shard_delivers():
        got = shard.get(cfg.learner.micro_batch_size, 1)
        if got:
            out = rank.opd_step(got, 1)
            trained.extend(tuple(u) for u in out["uids"])
            return [ledger.add(u) for u in out["uids"]]
        return []

    data, _ = worker.produce(2)
    assert shard.put_many(data) == ["ok", "ok"]
    assert train_what_the_shard_delivers() == [True, True]
    # 1. a re-put of a consumed (trained) record
    assert shard.put(data[0]) == "rejected"
    # 2. a restarted actor that replays its sequence numbers: same actor id and incarnation, seq 0 again
    replay = RolloutWorker(cfg, 0, items, incarnation=7, target=tiny)
    replay.set_weights(rank.gather_weights(), 1)
    again, _ = replay.produce(3)
    assert shard.put_many(again) == ["rejected", "rejected", "ok"]  # seqs 0, 1 trained already; seq 2 is new
    assert shard.put(again[2]) == "rejected"  # and now seq 2 is taken too (still queued)
    assert train_what_the_shard_delivers() == [True]
    s = shard.get_stats()
    assert s["duplicates"] == 4 and s["rejected"] == 4 and s["accepted"] == 3
    assert trained == [(0, 7, 0), (0, 7, 1), (0, 7, 2)]  # each record trained once
    # the driver's ledger is what would count a duplicate that got past a shard: it does
    assert ledger.add((0, 7, 1)) is False


def test_resume_continues_like_the_uninterrupted_run(setup, tmp_path):
    """Uninterrupted: 2 SFT steps, checkpoint, 2 OPD steps. Resumed: a new rank loads the checkpoint and takes the
    same 2 OPD steps. Same losses and weights; a rank given back only the weights (fresh Adam moments) differs."""
    cfg, worker, teacher, _, _ = setup
    a = new_rank(cfg, teacher)
    for _ in range(2):
        a.sft_step()
    weights, state = checkpoint_of(a)
    worker.set_weights(a.gather_weights(), 1)
    batches = [worker.produce(2)[0] for _ in range(2)]
    losses_a = [a.opd_step(b, 1)["loss"] for b in batches]
    w_a = a.gather_weights()
    assert all(math.isfinite(x) for x in losses_a)

    b = new_rank(cfg, teacher)
    b.load(weights, state)
    assert b.step == 2
    rng_at_load, torch_rng_at_load = copy.deepcopy(b.rng.bit_generator.state), torch.get_rng_state()
    losses_b = [b.opd_step(x, 1)["loss"] for x in batches]
    w_b = b.gather_weights()
    assert losses_b == pytest.approx(losses_a, rel=1e-6, abs=1e-7)
    for k in w_a:
        np.testing.assert_allclose(w_b[k], w_a[k], rtol=1e-6, atol=1e-7, err_msg=k)

    c = new_rank(cfg, teacher)  # the control: weights restored, optimizer state not
    c.load(weights, {**state, "optimizer": None})
    c.rng.bit_generator.state = rng_at_load  # the sampling is not what differs here
    torch.set_rng_state(torch_rng_at_load)
    for x in batches:
        c.opd_step(x, 1)
    w_c = c.gather_weights()
    assert max(float(np.abs(w_c[k] - w_a[k]).max()) for k in w_a) > 1e-4, (
        "the comparison cannot tell a lost optimizer state"
    )
