"""The Ray runner on the committed conversation example with data.answers=as_is: the rollout actors teacher-force
the dataset's answers, and the driver writes the Prometheus metrics to TensorBoard under their series names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dopd.common.load import load_config
from dopd.common.record import decode_teacher
from dopd.driver import RayFleet
from dopd.metrics import METRICS
from dopd.train import train

pytestmark = pytest.mark.ray

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conversations.jsonl"


def test_ray_runner_teacher_forces_given_answers(ray_session, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [
        "model.target=tiny-random-llama", f"data.prompts={EXAMPLE}", "data.num_eval=8", "data.answers=as_is", "mode=opd",
        "sft.warmup_steps=2", "learner.steps=4", "rollout.max_new_tokens=16", "rollout.batch_size=2", "eval.max_new_tokens=12",
        "eval.num_prompts=4", "learner.micro_batch_size=2", "learner.refresh_every=2", "learner.eval_every=100",
        "runner=ray", "cluster.actors=1", "cluster.learners=1", "cluster.actor_num_cpus=1", "metrics.port=0", "metrics.tensorboard=true",
        f"out_dir={tmp_path}",
    ])  # fmt: skip
    seen: dict = {}

    def on_step(job, step):
        if step == 3:  # the Ray actor's SFT data for two training examples: prompt + the dataset's answer
            seen["items"] = job.prompts.sft[:2]
            seen["teacher"] = [decode_teacher(b) for b in job.fleet.teacher_data(seen["items"])]

    summary = train(cfg, RayFleet(cfg, log=lambda *a: None), on_step=on_step)
    assert summary["steps"] == 6 and summary["records_trained"] == 4 * 2
    assert all(len(it) == 3 for it in seen["items"])
    assert [t.token_ids.tolist() for t in seen["teacher"]] == [ids + ans for _, ids, ans in seen["items"]]
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["data"]["answers"] == "as_is" and split["data"]["skipped_tool_call"] == 2
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    names = {t.split("/")[0] for t in tags}
    # the driver's whole registry: rollout, queue and restart series included; the silenced shares and the
    # replay-mismatch KL exist only where the objective trains verification blocks (this run's EAGLE-3 recipe trains
    # every position by TTT: it has neither)
    optional = {"dopd_learner_silenced_share", "dopd_replay_kl"}
    missing = [
        d.name
        for d in METRICS.values()
        if d.name not in optional and (d.series if d.kind != "histogram" else d.name + "_sum") not in names
    ]
    assert not missing, missing
    assert "dopd_queue_depth/shard=0" in tags and "dopd_learner_loss/stream=total" in tags
    assert [e.step for e in ea.Scalars("dopd_learner_steps_total")] == list(range(1, 7))
