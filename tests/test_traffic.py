"""Served traffic as rollout data (dopd/traffic.py): the bounded feed, and a Ray job that learns from it."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from dopd.common.errors import ConfigError
from dopd.common.load import load_config
from dopd.traffic import TrafficFeed


def served(i: int, n: int = 3) -> dict:
    return {"id": f"r{i}", "prompt": [1, 2, 3 + i], "output": list(range(5, 5 + n)), "replica": "rep0"}


def test_feed_is_fifo_bounded_and_counts_what_it_drops():
    feed = TrafficFeed(capacity=3)
    assert feed.offer([served(i) for i in range(5)]) == 5
    st = feed.stats()
    assert (st["offered"], st["accepted"], st["dropped"], st["depth"]) == (5, 5, 2, 3)
    got = feed.take(2, wait_s=0.0)
    assert [g[0] for g in got] == ["r2", "r3"]  # the oldest two were dropped, the rest come oldest first
    assert got[0][1:] == ([1, 2, 5], [5, 6, 7], "rep0")
    assert [g[0] for g in feed.take(10, wait_s=0.0)] == ["r4"]
    assert feed.take(1, wait_s=0.05) == []
    assert feed.stats()["taken"] == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"id": "x", "prompt": [], "output": [1]},
        {"id": "x", "prompt": [1], "output": []},
        {"id": "x", "prompt": [1, -2], "output": [1]},
        {"id": "x", "prompt": [1], "output": [1.5]},
        {"id": "x", "prompt": "hello", "output": [1]},
        "not a dict",
    ],
)
def test_feed_drops_a_malformed_text_and_keeps_the_rest(bad):
    feed = TrafficFeed(capacity=8)
    assert feed.offer([served(0), bad, served(1)]) == 2
    st = feed.stats()
    assert (st["offered"], st["dropped"], st["depth"]) == (3, 1, 2)


def test_take_waits_for_an_offer():
    feed = TrafficFeed()
    threading.Timer(0.2, lambda: feed.offer([served(7)])).start()
    t0 = time.monotonic()
    got = feed.take(4, wait_s=5.0)
    assert [g[0] for g in got] == ["r7"] and time.monotonic() - t0 < 4.0


def test_feed_keeps_only_the_newest_weights():
    feed = TrafficFeed()
    assert feed.latest() == (-1, None)
    feed.publish(["w2"], 2)
    feed.publish(["w1"], 1)  # an older version arriving late never replaces a newer one
    assert feed.latest() == (2, ["w2"]) and feed.stats()["version"] == 2


def test_traffic_source_needs_async_ray_and_resegmentation(tmp_path):
    base = ["model.target=tiny-random-llama", f"out_dir={tmp_path}", "rollout.source=traffic"]
    with pytest.raises(ConfigError, match="rollout.source=traffic .* Ray runner"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="rollout.temperature=0"):
        load_config(None, base + ["runner=ray", "rollout.temperature=1"])
    with pytest.raises(ConfigError, match="traffic_buffer"):
        load_config(None, ["model.target=tiny-random-llama", "rollout.traffic_buffer=0"])


@pytest.mark.ray
def test_a_ray_job_learns_from_served_texts(ray_session, tiny, tiny_prompts, tmp_path):
    """The learning half of `dopd serve --learn` without the HTTP half: a thread plays the replicas (the target's own
    greedy answers offered to the feed, as a replica offers each finished request); the job's actor re-segments them
    with the current drafter, the learners train, and the feed carries each published version back."""
    ray = ray_session
    from dopd.common.specdec import DecodeSettings, SpecEngine
    from dopd.driver import RayFleet
    from dopd.traffic import FEED_NAME
    from dopd.train import train

    prompts = list(tiny_prompts)[:8]
    results, _ = SpecEngine(tiny, None).generate(prompts, DecodeSettings(block_size=0, max_new_tokens=16))
    texts = [{"id": f"q{i}", "prompt": p, "output": r.output_ids, "replica": "replica-a"} for i, (p, r) in enumerate(zip(prompts, results))]  # fmt: skip
    stop = threading.Event()
    offered = {"n": 0}

    def replicas():
        while not stop.is_set():
            try:
                feed = ray.get_actor(FEED_NAME, namespace="dopd")
            except ValueError:
                time.sleep(0.2)
                continue
            feed.offer.remote(texts)  # fire-and-forget, as a replica does
            offered["n"] += len(texts)
            time.sleep(0.5)

    versions: list[int] = []

    def on_step(job, step):
        versions.append(ray.get(job.feed.latest.remote())[0])

    cfg = load_config(None, [
        "runner=ray", "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
        "sft.warmup_steps=0", "rollout.source=traffic", "rollout.batch_size=4", "rollout.max_new_tokens=16",
        "eval.max_new_tokens=12", "eval.num_prompts=4", "learner.micro_batch_size=2", "learner.refresh_every=1",
        "learner.steps=4", "learner.lr=3e-3", "learner.zero_stage=2", "cluster.actors=1", "cluster.learners=1",
        "cluster.actor_num_cpus=1", "metrics.port=0", "learner.eval_every=100", "learner.checkpoint_every=100",
        f"out_dir={tmp_path}",
    ])  # fmt: skip
    th = threading.Thread(target=replicas, daemon=True)
    th.start()
    try:
        job = RayFleet(cfg, log=lambda *a: None)
        summary = train(cfg, job, on_step=on_step)
        feed_stats = ray.get(ray.get_actor(FEED_NAME, namespace="dopd").stats.remote())
    finally:
        stop.set()
        th.join(timeout=10)
        try:
            ray.kill(ray.get_actor(FEED_NAME, namespace="dopd"))
        except ValueError:
            pass
    assert summary["steps"] == 4 and summary["records_trained_twice"] == 0
    assert summary["records_consumed"] == 4 * 2
    tr = summary["traffic"]
    assert tr["taken"] >= 8 and tr["accepted"] >= tr["taken"] and feed_stats["taken"] >= tr["taken"]
    # each step's published version reached the feed (the replicas' side), newest last
    assert versions == sorted(versions) and versions[-1] >= 4
    trained = [json.loads(x) for x in open(tmp_path / "opd_sequences.jsonl")]
    assert len(trained) == 8
    by_id = {f"replica-a/{t['id']}": t for t in texts}
    for t in trained:
        src = by_id[t["prompt_id"]]  # every trained record names the replica and request it came from
        assert t["token_ids"] == src["prompt"] + src["output"][: len(t["token_ids"]) - len(src["prompt"])]
    assert np.isfinite(
        [json.loads(x)["loss"] for x in open(tmp_path / "metrics.jsonl") if '"event": "step"' in x]
    ).all()
