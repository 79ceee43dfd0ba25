"""A 2-minute chaos soak (bench/soak.py) on its own local Ray: every fault at once, and the accounts must add up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def stop_soak(p: subprocess.Popen, log: Path) -> list[int]:
    """What a timed-out soak started must not outlive the test: SIGTERM first (soak.py then stops its `dopd train`
    and its Ray head itself), then SIGKILL its process group and every pid it logged (the Ray head runs in a
    session of its own). Returns the pids still alive after that (none, or the test says so)."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    started = []
    for line in log.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") in ("ray_up", "launch"):
            started.append(ev.get("head_pid") or ev.get("pid"))
    for pid in started:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, TypeError):
                pass
    deadline = time.time() + 30
    while (alive := [pid for pid in started if running(pid)]) and time.time() < deadline:
        time.sleep(0.5)
    return alive


def running(pid) -> bool:
    """A live process (a zombie waiting for its parent to reap it is gone: it holds nothing)."""
    try:
        return open(f"/proc/{int(pid)}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, TypeError, ValueError, IndexError):
        return False


def test_two_minute_soak_meets_every_aim(tmp_path):
    out, log = tmp_path / "soak.json", tmp_path / "soak.log"
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "2", "--json", str(out), "--out", str(tmp_path / "run"),
           "--steps-per-minute", "50", "--throttle-at", "0.1", "--throttle-s", "20", "--crash-at", "0.5", "--kill-every", "8"]  # fmt: skip
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        p.wait(timeout=float(os.environ.get("DOPD_SOAK_TIMEOUT_S", "900")))
    except subprocess.TimeoutExpired:
        alive = stop_soak(p, log)
        pytest.fail(
            f"the soak did not finish in time; stopped it (still alive: {alive or 'nothing'}):\n{log.read_text()[-3000:]}"
        )
    res = subprocess.CompletedProcess(cmd, p.returncode, log.read_text(), "")
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
