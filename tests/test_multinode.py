"""`--actors 4 --learners 2` on a real multi-node Ray (tests/multinode_job.py, in its own process: its own
raylets and object stores, never the session's shared Ray): placement over several nodes read from Ray's own node
ids, a worker node killed mid-run, the run reaches its planned step, nothing trained twice with a duplicate
actually delivered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.heavy]


def test_four_actors_two_learners_across_nodes_survive_a_node_killed(tmp_path):
    script = Path(__file__).with_name("multinode_job.py")
    env = {**os.environ, "DOPD_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=1200
    )
    (tmp_path / "log.txt").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    s, seen = out["summary"], out["seen"]
    bundles = seen["bundles"]
    assert len(bundles) == 6 and all(n in out["workers"] for n in bundles.values())
    assert len(set(bundles.values())) >= 2, f"everything on one node: {bundles}"
    assert seen["killed"] and seen["killed"] not in out["alive"], seen
    # the killed node's bundles were placed again, on nodes that are alive
    moved = {int(k): v for k, v in seen["bundles_after"].items()}
    assert all(moved[b] != seen["killed"] and moved[b] in out["alive"] for b in seen["killed_bundles"]), moved
    assert s["steps"] == 2 + 8, s
    assert s["actor_restarts"] >= len(seen["killed_bundles"])
    assert seen["duplicate"] == ["rejected", "rejected"]
    assert s["records_trained_twice"] == 0
    assert s["records_trained"] == s["records_consumed"] == 8 * 2 * 2
    assert "plan: ray runner, 4 rollout actor(s), 2 learner rank(s)" in res.stderr
    assert "5 node(s)" in res.stderr
