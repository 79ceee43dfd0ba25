"""Every dashboard panel shows data through a REAL Prometheus scraping a synthetic dopd job (all on loopback).

This is the check that matters for the dashboards: the static test proves the names exist; this one proves the
labels, selectors, rate windows and histogram queries return series once a job exports numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import stat
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dopd import prometheus
from dopd.common.errors import DopdError
from dopd.dashboards.check import missing_panels, missing_variables
from dopd.dashboards.queries import HERE, load, panel_queries
from dopd.metrics import METRICS, JobMetrics
from dopd.paths import prom_targets_dir

ROOT = Path(__file__).resolve().parents[1]
ACTORS = ("0", "1")
SHARDS = ("0", "1")
REPLICAS = ("r0", "r1")


@dataclass
class Step:  # one row's verification step, as the engine reports it to a replica's metrics
    accepted: int
    new_tokens: list[int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feed(jm: JobMetrics, stop: threading.Event) -> None:
    """Update every metric a few times a second, the way the driver does during training."""
    rng = random.Random(0)
    version = 0
    while not stop.is_set():
        version += 1
        for a in ACTORS:
            alpha = [max(0.0, 0.9 - 0.15 * k + rng.uniform(-0.05, 0.05)) for k in range(4)]  # positions 1..4
            jm.rollout(
                a,
                tau=2.0 + rng.random(),
                alpha=alpha,
                tokens=rng.randint(50, 150),
                seconds=0.5,
                anchors=rng.randint(1, 10),
                replay_seconds=0.1,
                records=rng.randint(1, 4),
            )
            jm["dopd_actor_restarts"].labels(actor=a).inc(rng.random() < 0.3)
        jm.heldout(2.5 + 0.01 * version, [0.9, 0.7, 0.5, 0.3])
        jm.learner(
            loss=1.0 / version,
            acc=0.6 / version,
            rej=0.4 / version,
            grad_norm=rng.random(),
            seconds=rng.uniform(0.05, 2.0),
            flops=1e12,
            records=4,
            staleness=[rng.randint(0, 4) for _ in range(4)],
        )
        jm.diagnostics(
            {
                "grad_norm_head": 0.0,
                "grad_norm_body": rng.random(),
                "acc_silenced": 0.1 * rng.random(),
                "rej_silenced": rng.random(),
                "alpha_trained": [0.8, 0.6, 0.4, 0.2],
                **{f"replay_kl_{g}": rng.random() for g in ("matched", "accepted", "first_rejected", "post_rejection")},
            }
        )
        jm["dopd_policy_version"].set(version)
        jm["dopd_publish_latency_seconds"].observe(rng.uniform(0.01, 1.0))
        for s in SHARDS:
            jm["dopd_queue_depth"].labels(shard=s).set(rng.randint(0, 64))
            jm["dopd_queue_bytes"].labels(shard=s).set(rng.randint(0, 2**20))
            jm["dopd_records_dropped_stale"].labels(shard=s).inc(rng.randint(0, 2))
            jm["dopd_records_dropped_full"].labels(shard=s).inc(rng.randint(0, 2))
            jm["dopd_records_rejected"].labels(shard=s).inc(rng.randint(0, 1))
        jm["dopd_traffic_taken"].inc(rng.randint(0, 3))
        jm["dopd_traffic_dropped"].inc(rng.randint(0, 1))
        jm["dopd_traffic_waiting"].set(rng.randint(0, 8))
        stop.wait(0.25)


def feed_replicas(replicas: list, stop: threading.Event) -> None:
    """Serve traffic as a replica's engine loop and routes report it (ReplicaMetrics, dopd/serve.py)."""
    rng = random.Random(1)
    while not stop.is_set():
        for m in replicas:
            acc = [rng.randint(0, 4) for _ in range(8)]
            m.on_step([Step(a, [1] * (a + 1)) for a in acc], 4)
            m.ttft.labels(m.replica).observe(rng.uniform(0.01, 0.5))
            m.per_token.labels(m.replica).observe(rng.uniform(0.01, 0.1))
            m.latency.labels(m.replica).observe(rng.uniform(0.5, 5.0))
            m.requests.labels(m.replica, "/v1/completions", "200").inc()
            m.in_flight.labels(m.replica).set(rng.randint(0, 4))
            m.policy.labels(m.replica).inc()
            m.offered.labels(m.replica).inc()
        stop.wait(0.25)


@pytest.fixture
def dopd_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dopd_home"
    monkeypatch.setenv("DOPD_HOME", str(home))
    return home


@pytest.fixture
def live(tmp_path, dopd_home):
    """A fed JobMetrics endpoint and two fed serving replicas' endpoints registered as file_sd targets, and a
    Prometheus scraping them every second."""
    from prometheus_client import start_http_server

    from dopd.serve import ReplicaMetrics

    jm = JobMetrics()
    port = jm.serve("127.0.0.1", 0)
    replicas = [ReplicaMetrics(r, K=4) for r in REPLICAS]
    servers = [start_http_server(0, addr="127.0.0.1", registry=m.registry)[0] for m in replicas]
    stop = threading.Event()
    feeders = [
        threading.Thread(target=feed, args=(jm, stop), daemon=True),
        threading.Thread(target=feed_replicas, args=(replicas, stop), daemon=True),
    ]
    for f in feeders:
        f.start()
    proc = None
    try:
        for r, srv in zip(REPLICAS, servers):
            prometheus.register_job_target(f"serve-{r}", "127.0.0.1", srv.server_port, {"run": "serve"})
        target = prometheus.register_job_target("dopd-live-test", "127.0.0.1", port, {"run": "synthetic"})
        cfg = prometheus.write_config(
            tmp_path / "prom" / "prometheus.yml", scrape_interval="1s", ray_sd_file=tmp_path / "no-ray" / "sd.json"
        )
        prom_port = free_port()
        proc = prometheus.start(cfg, tmp_path / "prom" / "data", port=prom_port)
        yield {"url": f"http://127.0.0.1:{prom_port}", "target": target, "metrics_port": port, "proc": proc}
    finally:
        stop.set()
        for f in feeders:
            f.join(5)
        if proc is not None:
            prometheus.stop(proc)
        jm.close()
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def _poll(fn, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if not result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def test_every_panel_of_every_dashboard_has_data(live, tmp_path):
    url = live["url"]
    assert len(list(HERE.glob("*.json"))) == 3
    missing = _poll(lambda: missing_panels(url, HERE, job="dopd", rate_interval="10s"), timeout=40)
    assert missing == [], "panels without data:\n" + "\n".join(map(str, missing))
    assert missing_variables(url, HERE) == []

    # The target carries the labels the dashboards and people rely on.
    (up,) = prometheus.query(url, 'up{job="dopd", run="synthetic"}')
    assert up["value"][1] == "1"
    assert up["metric"]["dopd_job"] == "dopd-live-test" and up["metric"]["run"] == "synthetic"
    assert up["metric"]["instance"] == f"127.0.0.1:{live['metrics_port']}"
    assert sorted(prometheus.label_values(url, "actor", METRICS["dopd_rollout_tau"].series)) == list(ACTORS)
    positions = {r["metric"]["position"] for r in prometheus.query(url, METRICS["dopd_acceptance_rate"].series)}
    assert positions == {"1", "2", "3", "4"}

    # A panel on a label nobody exports is reported: the checker can fail.
    assert prometheus.query(url, 'dopd_queue_depth{job="dopd", shard="99"}') == []

    end = time.time()
    rows = prometheus.query_range(url, 'dopd_rollout_tau{job="dopd"}', end - 30, end, 1)
    assert {r["metric"]["actor"] for r in rows} == set(ACTORS) and all(len(r["values"]) >= 2 for r in rows)

    # The renderer draws the overview's panels from the same Prometheus.
    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "bench" / "render_dashboard.py")
    render_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_mod)
    png = render_mod.render(
        url, HERE / "training_overview.json", tmp_path / "overview.png", end - 20, end, step=1, rate_interval="10s"
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    drawn = render_mod.main_panels(load(HERE / "training_overview.json"))
    assert all(render_mod.fetch(url, p, end - 20, end, 1, "dopd", ".*", "10s") for p in drawn)

    # Unregistering removes the target (file_sd notices the file going away).
    prometheus.unregister_job_target("dopd-live-test")
    assert not live["target"].exists()

    def still_active():
        with urllib.request.urlopen(f"{url}/api/v1/targets?state=active", timeout=5) as r:
            active = json.load(r)["data"]["activeTargets"]
            return [t for t in active if t["labels"]["job"] == "dopd" and t["labels"]["run"] == "synthetic"]

    assert _poll(still_active, timeout=20) == []


def test_missing_panels_reports_a_prometheus_without_dopd_data(tmp_path, dopd_home):
    """Against a Prometheus that scrapes nothing, every panel is reported missing (a PromQL error would be too)."""
    cfg = prometheus.write_config(tmp_path / "prometheus.yml", scrape_interval="1s", ray_sd_file=tmp_path / "sd.json")
    port = free_port()
    proc = prometheus.start(cfg, tmp_path / "data", port=port)
    try:
        url = f"http://127.0.0.1:{port}"
        missing = missing_panels(url, HERE)
        total = sum(len(panel_queries(load(p))) for p in HERE.glob("*.json"))
        assert len(missing) == total > 0
        assert {v for _, v, _ in missing_variables(url, HERE)} == {"job", "actor", "replica"}
        with pytest.raises(DopdError, match="parse error|bad_data"):
            prometheus.query(url, "sum(")
    finally:
        prometheus.stop(proc)
    assert proc.returncode is not None


def test_write_config_and_targets(tmp_path, dopd_home):
    cfg_path = prometheus.write_config(tmp_path / "p.yml")
    cfg = yaml.safe_load(cfg_path.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["dopd"]["file_sd_configs"][0]["files"] == [str(prom_targets_dir() / "*.json")]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [prometheus.RAY_SD_FILE]
    assert cfg["global"]["scrape_interval"] == "2s"
    assert str(prom_targets_dir()).startswith(str(dopd_home))

    path = prometheus.register_job_target("run-1", "0.0.0.0", 9400)
    assert path == prom_targets_dir() / "run-1.json"
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:9400"], "labels": {"dopd_job": "run-1"}}]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # a containerised Prometheus runs as another user
    assert [p.name for p in prom_targets_dir().iterdir()] == ["run-1.json"]  # no temp files left behind
    prometheus.unregister_job_target("run-1")
    prometheus.unregister_job_target("run-1")  # twice is fine
    assert list(prom_targets_dir().iterdir()) == []
    with pytest.raises(DopdError, match="job name"):
        prometheus.register_job_target("../escape", "127.0.0.1", 1)

    # a job killed before it unregistered left its file; the next job on the same port replaces it (else every
    # series is scraped twice, under both job names); a job on another port and a foreign file are left alone
    prometheus.register_job_target("killed", "127.0.0.1", 9400)
    prometheus.register_job_target("other-port", "127.0.0.1", 9401)
    (prom_targets_dir() / "foreign.json").write_text("not json")
    prometheus.register_job_target("run-2", "127.0.0.1", 9400)
    assert sorted(p.name for p in prom_targets_dir().iterdir()) == ["foreign.json", "other-port.json", "run-2.json"]


def test_find_binary_and_start_errors(tmp_path, monkeypatch, dopd_home):
    assert Path(prometheus.find_binary()).name == "prometheus"
    monkeypatch.delenv("DOPD_PROMETHEUS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DopdError, match="Prometheus is not installed: apt-get install prometheus"):
        prometheus.find_binary()
    monkeypatch.undo()
    monkeypatch.setenv("DOPD_HOME", str(dopd_home))

    bad = tmp_path / "bad.yml"
    bad.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 5s\n")  # timeout > interval: config error
    with pytest.raises(DopdError, match="exited with code"):
        prometheus.start(bad, tmp_path / "data", port=free_port(), timeout=20)
