"""TensorBoard and W&B sinks: off by default, the Prometheus series names, the values the registry holds."""

from __future__ import annotations

import sys
import types

import pytest

from dopd.common.errors import ConfigError
from dopd.common.load import load_config
from dopd.metrics import METRICS, JobMetrics
from dopd.sinks import check_sinks, make_sinks


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def _feed(jm: JobMetrics, state: dict) -> None:
    """What the distributed driver does in one step: rollout stats, a learner step, its own gauges, an eval."""
    jm["dopd_policy_version"].set(3)
    jm["dopd_queue_depth"].labels(shard="0").set(5)
    jm["dopd_queue_bytes"].labels(shard="0").set(1234)
    jm["dopd_publish_latency_seconds"].observe(0.2)
    jm["dopd_records_dropped_stale"].labels(shard="0").inc(1)
    jm["dopd_records_dropped_full"].labels(shard="0").inc(0)
    jm["dopd_records_rejected"].labels(shard="0").inc(2)
    jm["dopd_actor_restarts"].labels(actor="1").inc(1)
    jm.rollout("1", 2.5, [0.9, 0.6], tokens=100, seconds=4.0, anchors=7, replay_seconds=0.5, records=8)
    state["step"] = 1
    jm.learner(1.5, 1.25, 0.75, grad_norm=3.0, seconds=0.4, flops=1e9, records=4, staleness=[0, 1])
    state["step"] = 2
    jm.learner(1.0, 0.5, 0.25, grad_norm=2.0, seconds=0.6, flops=1e9, records=4, staleness=[1])
    jm.diagnostics(
        {
            "grad_norm_head": 0.0,
            "grad_norm_body": 2.0,
            "acc_silenced": 0.1,
            "rej_silenced": 0.4,
            "replay_kl_matched": 3.0,
            "replay_kl_first_rejected": 5.0,
            "alpha_trained": [0.3, None],
        }
    )
    jm.heldout(1.75, [0.5, 0.25])


def test_off_by_default_and_one_key_each(tmp_path):
    assert make_sinks(load_config(None, [f"out_dir={tmp_path}"]), fresh=True) is None
    assert not (tmp_path / "tensorboard").exists()
    s = make_sinks(load_config(None, [f"out_dir={tmp_path}", "metrics.tensorboard=true"]), fresh=True)
    assert s is not None and len(s.sinks) == 1
    s.close()


def test_tensorboard_has_every_prometheus_series(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "metrics.tensorboard=true"])
    jm = JobMetrics()
    state = {"step": 0}
    jm.attach(make_sinks(cfg, fresh=True), step=lambda: state["step"])
    _feed(jm, state)
    jm.close()
    got = _scalars(tmp_path / "tensorboard")
    # every metric of dopd/metrics.py is there under its Prometheus series name
    names = {t.split("/")[0] for t in got}
    for d in METRICS.values():
        want = {d.series} if d.kind != "histogram" else {d.name + "_sum", d.name + "_count"}
        assert want <= names, (d.name, sorted(names))
    assert got["dopd_heldout_tau"] == [(2, 1.75)]
    assert got["dopd_learner_loss/stream=accepted"] == [(1, 1.25), (2, 0.5)]
    assert got["dopd_learner_steps_total"] == [(1, 1.0), (2, 2.0)]  # counters: the running total, as Prometheus has it
    assert got["dopd_learner_step_seconds_sum"][-1] == (2, pytest.approx(1.0))
    assert got["dopd_acceptance_rate/source=rollout,position=2"] == [(0, pytest.approx(0.6))]
    assert got["dopd_acceptance_rate/source=heldout,position=1"] == [(2, 0.5)]
    assert got["dopd_rollout_tokens_total/actor=1"] == [(0, 100.0)]
    assert got["dopd_queue_depth/shard=0"] == [(1, 5.0), (2, 5.0)]
    assert got["dopd_learner_silenced_share/stream=rejected"] == [(2, pytest.approx(0.4))]
    assert got["dopd_replay_kl/group=first_rejected"] == [(2, 5.0)]
    assert got["dopd_acceptance_rate/source=trained,position=1"] == [(2, pytest.approx(0.3))]
    assert "dopd_acceptance_rate/source=trained,position=2" not in got  # no block reached it: no value
    assert got["dopd_records_rejected_total/shard=0"][-1] == (2, 2.0)


def test_wandb_offline_same_names(tmp_path, monkeypatch):
    calls: dict = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", "metrics.wandb=true"])
    check_sinks(cfg)
    jm = JobMetrics()
    state = {"step": 0}
    jm.attach(make_sinks(cfg, fresh=True), step=lambda: state["step"])
    _feed(jm, state)
    jm.close()
    kw = calls["init"]
    assert kw["mode"] == "offline" and kw["dir"] == str(tmp_path / "run" / "wandb") and kw["name"] == "run"
    assert kw["config"]["metrics"]["wandb"] is True and calls["finished"]
    logged = {}
    for step, values in calls["log"]:
        for k, v in values.items():
            logged.setdefault(k, []).append((step, v))
    assert logged["dopd_heldout_tau"] == [(2, 1.75)] and logged["dopd_learner_loss/stream=total"] == [
        (1, 1.5),
        (2, 1.0),
    ]


def test_missing_packages_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = load_config(None, [f"out_dir={tmp_path}", "metrics.wandb=true"])
    for fn in (lambda: check_sinks(cfg), lambda: make_sinks(cfg, fresh=True)):
        with pytest.raises(ConfigError, match="metrics.wandb=true needs the wandb package"):
            fn()
