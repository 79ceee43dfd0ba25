"""`dopd cluster up / join / status / down` with real Ray processes: down stops what up and join started, only that.

The head and the worker here are real `ray start` nodes on loopback, each with its own temp directory and ports;
a Ray this suite did not start through `dopd cluster` (the session's Ray, and a process named like a raylet) must
still run after `down`. The token of the head goes to the worker through a file and never shows on a command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from dopd import cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dopd.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """A head's and a worker's dopd state (and HOME: the head writes its token to ~/.ray/auth_token)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # dopd cluster up turns token auth on
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    return {"head": tmp_path / "dopd-head", "worker": tmp_path / "dopd-worker", "home": home, "env": env}


@pytest.mark.ray
def test_down_stops_what_up_and_join_started_and_nothing_else(ray_session, homes, monkeypatch):
    # a Ray this suite started without `dopd cluster`: the session's raylet and GCS
    node = ray_session._private.worker._global_node
    foreign = [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]
    assert foreign
    # and a process whose command line reads like a raylet's (what `ray stop --force` matches by name)
    fake = subprocess.Popen(["bash", "-c", "exec -a /tmp/ray/session_latest/raylet sleep 600"])
    port = free_port()
    monkeypatch.setenv("DOPD_HOME", str(homes["head"]))
    started = []
    try:
        info = cluster.up(None, 1, 0, port, "127.0.0.1", False, 9090, 80 * 2**20)
        started = info["processes"]
        assert info["address"] == f"127.0.0.1:{port}" and len(started) >= 2
        names = " ".join(p["name"] for p in started)
        assert "gcs_server" in names and "raylet" in names
        assert not {p["pid"] for p in started} & set(foreign)
        token_file = homes["home"] / ".ray" / "auth_token"
        assert token_file.is_file(), "the head was started with token authentication"
        token = token_file.read_text().strip()

        # a worker node on this machine, joined with the token from a file
        wenv = {**homes["env"], "DOPD_HOME": str(homes["worker"])}
        j = cli(
            "cluster", "join", f"127.0.0.1:{port}", "--token-file", str(token_file), "--num-cpus", "1",
            "--resources", '{"node_w": 1}', env=wenv,
        )  # fmt: skip
        assert j.returncode == 0, j.stdout + j.stderr
        assert token not in j.stdout + j.stderr
        winfo = json.loads((homes["worker"] / "cluster.json").read_text())
        assert token not in json.dumps(winfo)
        for rec in winfo["processes"]:
            cmd = " ".join(psutil.Process(rec["pid"]).cmdline())
            assert token not in cmd, f"the token is on the command line of {rec['name']}"
        started += winfo["processes"]

        # status from the head's record: two nodes, resources, used share
        st = cli("cluster", "status", env={**homes["env"], "DOPD_HOME": str(homes["head"])})
        assert st.returncode == 0, st.stdout + st.stderr
        status = json.loads(st.stdout[st.stdout.index("{") :])
        alive = [n for n in status["nodes"] if n["alive"]]
        assert len(alive) == 2 and {n["node_id"] for n in alive} and all("used_share" in n for n in alive)
        assert any(n["resources"].get("node_w") == 1 for n in alive)
        assert status["cluster_resources"]["CPU"] == 2
        for d in (info["temp_dir"], winfo["temp_dir"]):  # the token is in no Ray log either
            for root, _, files in os.walk(d):
                for f in files:
                    if f.endswith((".log", ".out", ".err")):
                        with open(os.path.join(root, f), errors="replace") as fh:
                            assert token not in fh.read(), f"token in {f}"

        # down on the worker, then on the head: their processes stop; the others still run
        wd = cli("cluster", "down", env=wenv)
        assert wd.returncode == 0 and "stopped" in wd.stdout, wd.stdout + wd.stderr
        lines = cluster.down()
        assert any("stopped" in line and "Ray process" in line for line in lines), lines
        time.sleep(0.5)
        for rec in started:
            assert not cluster._alive(rec), f"{rec['name']} ({rec['pid']}) still runs after down"
        for pid in foreign:
            assert psutil.pid_exists(pid), f"down stopped the session's Ray process {pid}"
        assert fake.poll() is None, "down stopped a Ray-named process it did not start"
        assert ray_session.is_initialized() and ray_session.cluster_resources().get("CPU")
        assert not (homes["head"] / "cluster.json").exists()
    finally:
        fake.kill()
        for rec in started:  # never leave a node behind when an assert failed half-way
            p = cluster._alive(rec)
            if p is not None:
                p.kill()


def test_down_with_nothing_recorded_stops_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPD_HOME", str(tmp_path))
    fake = subprocess.Popen(["bash", "-c", "exec -a /tmp/ray/session_latest/gcs_server sleep 600"])
    try:
        assert cluster.down() == [
            "no Ray processes recorded: nothing of Ray stopped (only what `dopd cluster up` starts is)"
        ]
        assert fake.poll() is None
    finally:
        fake.kill()


def test_a_reused_pid_is_not_stopped(tmp_path, monkeypatch):
    """A recorded pid whose start time differs is another process now: down leaves it alone."""
    monkeypatch.setenv("DOPD_HOME", str(tmp_path))
    other = subprocess.Popen(["sleep", "600"])
    try:
        rec = {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 100, "name": "raylet"}
        (tmp_path / "cluster.json").write_text(json.dumps({"address": "127.0.0.1:1", "processes": [rec]}))
        lines = cluster.down()
        assert "1 had already exited" in lines[0]
        assert other.poll() is None
    finally:
        other.kill()


def test_join_refuses_a_missing_or_empty_token_file(tmp_path, monkeypatch):
    from dopd.common.errors import DopdError

    monkeypatch.setenv("DOPD_HOME", str(tmp_path))
    with pytest.raises(DopdError, match="--token-file"):
        cluster.join("127.0.0.1:1", tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(DopdError, match="is empty"):
        cluster.join("127.0.0.1:1", tmp_path / "empty")
