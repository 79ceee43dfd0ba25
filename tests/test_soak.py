"""A 2-minute chaos soak (bench/soak.py) on its own local Ray: every fault at once, and the accounts must add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def test_two_minute_soak_meets_every_aim(tmp_path):
    out = tmp_path / "soak.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "2", "--json", str(out), "--out", str(tmp_path / "run"),
         "--steps-per-minute", "50", "--throttle-at", "0.1", "--throttle-s", "20", "--crash-at", "0.5", "--kill-every", "8"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.is_file(), f"the soak wrote no report:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    r = json.loads(out.read_text())
    failed = [k for k, ok in r["aims"].items() if not ok]
    assert not failed, f"aims missed: {failed}\n{json.dumps({k: v for k, v in r.items() if k != 'events'}, indent=1)}"
    assert res.returncode == 0
    # the faults really happened
    assert r["actor_kills"] >= 3 and r["actor_restarts"] >= 3
    assert r["learner_kills"] == 1 and r["resumes"] == 1
    assert r["records_rejected"] >= 2 * r["injected"]["garbage"] >= 2
    assert r["records_trained"] > 0 and r["final_step"] == r["planned_step"]
    assert r["records_trained_twice"] == 0
    assert r["queue_peak_bytes"] <= r["queue_max_bytes"]
    assert {"driver", "rollout_actor", "learner_rank", "queue_shard"} <= set(r["peak_rss_mib"])
