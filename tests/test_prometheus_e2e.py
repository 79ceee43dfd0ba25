"""End to end with a REAL Prometheus and a REAL training job: every dashboard panel and variable has data.

A dashboard that references a metric (or label) the job does not export fails here: the job's own endpoint is
what Prometheus scrapes, found through the file_sd target the driver registers in DOPD_HOME.
"""

from __future__ import annotations

import socket

import pytest

from dopd import prometheus
from dopd.common.load import load_config
from dopd.dashboards.check import missing_panels, missing_variables
from dopd.dashboards.queries import HERE, TRAINING_FILES
from dopd.driver import RayFleet
from dopd.paths import prom_targets_dir
from dopd.train import train

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_panel_has_data_from_a_real_training_job(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("DOPD_HOME", str(tmp_path / "home"))
    cfg_path = prometheus.write_config(
        tmp_path / "prom" / "prometheus.yml", scrape_interval="1s", targets_dir=prom_targets_dir()
    )
    port = free_port()
    proc = prometheus.start(cfg_path, tmp_path / "prom" / "data", host="127.0.0.1", port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        cfg = load_config(None, [
            "runner=ray", "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
            "sft.warmup_steps=2", "sft.num_prompts=8", "sft.max_new_tokens=12", "rollout.max_new_tokens=16",
            "rollout.batch_size=2", "eval.max_new_tokens=8", "eval.num_prompts=2", "learner.micro_batch_size=2",
            "learner.refresh_every=2", "learner.steps=8", "learner.eval_every=4", "learner.checkpoint_every=100",
            "cluster.actors=2", "cluster.learners=2", "metrics.port=0", "metrics.linger_s=10", f"out_dir={tmp_path / 'run'}",
            # a recipe that trains verification blocks with both streams: every diagnostics panel has a series
            "drafter.kind=dflash", "loss.recipe=official-2605",
        ])  # fmt: skip
        summary = train(cfg, RayFleet(cfg, log=lambda *a: None))
        assert summary["steps"] == 10
        # ask about late in the job's 10 s linger (it writes summary.json, then lingers, then unregisters its
        # target): once Prometheus drops the target its series are marked stale, so "now" would be a race; and on a
        # fast machine the job can end before Prometheus has scraped its new target twice (discovery takes up to
        # ~5 s), so rate() has its two samples only late in the linger
        at = (tmp_path / "run" / "summary.json").stat().st_mtime + 8.0
        missing = missing_panels(url, HERE, rate_interval="1m", at=at, files=TRAINING_FILES)
        assert missing == [], missing
        assert missing_variables(url, HERE, files=TRAINING_FILES) == []
    finally:
        prometheus.stop(proc)
