"""The distributed job on a real local Ray with tiny models: 2 actors, 2 shards, 2 ZeRO-2 learner ranks (gloo)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from dopd import checkpoint
from dopd.common.errors import DopdError
from dopd.common.load import load_config
from dopd.driver import RayFleet
from dopd.metrics import METRICS
from dopd.train import train

pytestmark = pytest.mark.ray

BASE = [
    "runner=ray", "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
    "sft.num_prompts=16", "sft.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.batch_size=2",
    "eval.max_new_tokens=12", "eval.num_prompts=4", "learner.micro_batch_size=2", "learner.refresh_every=2",
    "learner.lr=3e-3", "learner.zero_stage=2", "cluster.actors=2", "cluster.learners=2", "cluster.actor_num_cpus=1",
    "metrics.port=0", "learner.eval_every=100",
]  # fmt: skip


def cfg_for(out, *extra):
    return load_config(None, BASE + [f"out_dir={out}"] + list(extra))


def test_two_actors_two_shards_two_zero2_ranks(ray_session, tmp_path):
    ray = ray_session
    seen: dict = {}

    def on_step(job, step):
        if step == 3:  # garbage into a shard: rejected and counted, training goes on
            assert ray.get(job.shards[0].put.remote(b"definitely not a record")) == "rejected"
            # a record taken from a shard (as a learner takes it) and offered again: a duplicate, refused and
            # counted there (the test consumed it, so it is "lost in flight" below, never trained)
            taken = ray.get(job.shards[0].get.remote(1, job.policy_version, 60.0))
            assert len(taken) == 1 and ray.get(job.shards[0].put_many.remote([taken[0], taken[0]])) == [
                "rejected",
                "rejected",
            ]
            seen["metrics"] = (
                urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read().decode()
            )
        if step == 4:  # kill a rollout actor mid-run: Ray restarts it, the driver re-sends weights
            seen["incarnation"] = job.fleet.known[1]
            ray.kill(job.fleet.handles[1], no_restart=False)

    cfg = cfg_for(tmp_path, "sft.warmup_steps=2", "learner.steps=8", "learner.checkpoint_every=4")
    job = RayFleet(cfg, log=lambda *a: None)
    summary = train(cfg, job, on_step=on_step)
    assert summary["steps"] == 10
    assert summary["policy_version"] == 1 + 8 // 2  # warm-up publish + one per refresh
    assert summary["records_trained_twice"] == 0
    assert summary["records_rejected"] >= 3 and sum(s["duplicates"] for s in job._last_shards) == 2
    assert summary["actor_restarts"] == 1 and job.fleet.known[1] != seen["incarnation"]
    assert summary["records_consumed"] == 8 * 2 * 2  # steps x ranks x micro-batch
    assert summary["records_produced"] >= summary["records_consumed"]
    # every record accounted for: trained, dropped, lost in flight (none: no crash) or still queued
    assert summary["records_trained"] == summary["records_consumed"]
    assert summary["records_lost_in_flight"] == 1  # the one the test took
    assert (
        summary["records_produced"]
        == summary["records_trained"]
        + summary["records_dropped_stale"]
        + summary["records_dropped_full"]
        + summary["records_queued"]
        + 1
    )
    assert 0 < summary["queue_peak_bytes"] <= summary["queue_max_bytes"]
    for key in ("records_dropped_stale", "tau", "wall_s"):
        assert key in summary
    steps = [
        json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"step"' in x and json.loads(x)["event"] == "step"
    ]
    opd = [r for r in steps if r["phase"] == "opd"]
    # records were produced by the versions the learners published: staleness small and non-negative
    stale = [s for r in opd for s in r["staleness"]]
    assert stale and min(stale) >= 0 and max(stale) <= 4
    assert (
        max(r["policy_version"] for r in opd) == summary["policy_version"] - 1
        or max(r["policy_version"] for r in opd) == summary["policy_version"]
    )
    text = seen["metrics"]
    for name, d in METRICS.items():
        assert d.name in text, f"/metrics does not serve {name}"
    assert 'dopd_records_rejected_total{shard="0"}' in text
    assert (tmp_path / "drafter" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 10


def test_learner_crash_resumes_at_the_same_step_and_version(ray_session, tmp_path):
    ray = ray_session
    weights: dict = {}

    def crash(job, step):
        if step == 4:  # just checkpointed: the learners' weights as saved
            weights["saved"] = ray.get(job.learners.handles[0].gather_weights.remote())
        if step == 5:
            raise RuntimeError("simulated learner crash")

    def after_resume(job, step):
        if step == 5:  # what the resumed job published before its first step: the checkpoint's weights
            weights["resumed"] = ray.get(job.fleet.weights[0])

    cfg = cfg_for(
        tmp_path,
        "sft.warmup_steps=2",
        "learner.steps=6",
        "learner.checkpoint_every=4",
        "cluster.actors=1",
        "cluster.learners=2",
    )
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, RayFleet(cfg, log=lambda *a: None), on_step=crash)
    saved = checkpoint.find(tmp_path).state()["run"]
    assert saved["step"] == 4 and saved["policy_version"] == 2
    summary = train(cfg, RayFleet(cfg, log=lambda *a: None), resume=True, on_step=after_resume)
    assert weights["resumed"].keys() == weights["saved"].keys()
    for k, v in weights["saved"].items():
        np.testing.assert_array_equal(weights["resumed"][k], v, err_msg=k)
    steps = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if json.loads(x)["event"] == "step"]
    after = [r for r in steps if r["time"] > 0][-4:]
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert after[0]["policy_version"] == 2
    assert summary["steps"] == 8 and summary["records_trained_twice"] == 0 and summary["resumes"] == 1
    # the crash was recorded and folded in: what the crashed job had queued or trained after its checkpoint is
    # "lost in flight", so the accounts still add up across the two jobs
    assert (tmp_path / "checkpoints" / "crash_resumed_1.json").is_file()
    assert (
        summary["records_produced"]
        == summary["records_trained"]
        + summary["records_dropped_stale"]
        + summary["records_dropped_full"]
        + summary["records_lost_in_flight"]
        + summary["records_queued"]
    )
    assert summary["records_lost_in_flight"] >= 2 * 2  # step 5's micro-batches were trained after the step-4 checkpoint


def test_sft_data_fans_out_over_every_actor_in_order(ray_session):
    """The warm-up data is split over all actors (contiguous chunks) and comes back in the prompts' order."""
    ray = ray_session
    from dopd.fleet import RolloutFleet, split_even

    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]] and split_even([1], 3) == [[1], [], []]

    @ray.remote
    class Answer:
        def __init__(self, i):
            self.i = i

        def teacher_data(self, items):
            return [f"{self.i}:{x}".encode() for x in items]

    fleet = RolloutFleet.__new__(RolloutFleet)
    fleet.handles = [Answer.remote(i) for i in range(3)]
    out = fleet.teacher_data(list(range(8)))
    assert [int(b.split(b":")[1]) for b in out] == list(range(8))
    assert {b.split(b":")[0] for b in out} == {b"0", b"1", b"2"}  # every actor answered its share


def test_zero3_gathers_full_weights(ray_session, tmp_path):
    cfg = cfg_for(
        tmp_path,
        "sft.warmup_steps=1",
        "learner.steps=2",
        "learner.checkpoint_every=100",
        "learner.zero_stage=3",
        "cluster.actors=1",
        "drafter.kind=dflash",
    )
    summary = train(cfg, RayFleet(cfg, log=lambda *a: None))
    assert summary["steps"] == 3 and summary["zero_stage"] == 3
    from dopd.common.drafters import load_drafter
    from dopd.common.models import load_frozen_io

    info, embed, head, _ = load_frozen_io("tiny-random-llama")
    d = load_drafter(tmp_path / "drafter", info, embed, head)  # complete (not partitioned) weights
    assert d.num_parameters() > 0


def test_placement_that_cannot_fit_is_a_clear_error(ray_session, tmp_path):
    cfg = cfg_for(
        tmp_path, "cluster.actors=1", "cluster.actor_num_gpus=1", "learner.steps=1", "cluster.placement_timeout_s=2"
    )
    with pytest.raises(DopdError, match="cannot place 1 actors"):
        train(cfg, RayFleet(cfg, log=lambda *a: None))
