"""`dopd cluster up|down|status`: a Ray head (or a worker joining one) on loopback unless told otherwise.

`up` starts `ray start --head` with its ports on 127.0.0.1, Ray's token authentication on (the token lives in
~/.ray/auth_token; clients on this machine find it there), and records the address in ~/.dopd/cluster.json, where
`dopd train` finds it; `--with-prometheus` also starts a local Prometheus that scrapes dopd jobs and Ray. `down`
stops what `up` started. `status` lists nodes, resources, running dopd jobs and the Prometheus address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dopd.common.errors import DopdError
from dopd.paths import state_dir

from .connection import CLUSTER_FILE, join_cluster, use_recorded_auth


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    if exe.is_file():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise DopdError("the `ray` command is not installed in this environment (pip install 'ray[default]')")
    return found


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "token")  # never start an unauthenticated head by accident
    return env


def _read() -> dict:
    f = state_dir() / CLUSTER_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _write(info: dict) -> None:
    (state_dir() / CLUSTER_FILE).write_text(json.dumps(info, indent=1))


def up(
    address: str | None,
    num_cpus: int | None,
    num_gpus: int | None,
    port: int,
    host: str,
    with_prometheus: bool,
    prometheus_port: int,
    object_store_memory: int | None,
) -> dict:
    """Start a head (no address) or join `address`; returns what was recorded in cluster.json."""
    cmd = [_ray_bin(), "start", "--disable-usage-stats", f"--node-ip-address={host}"]
    if address:
        cmd += [f"--address={address}"]
    else:
        cmd += [
            "--head",
            f"--port={port}",
            "--include-dashboard=true",
            f"--dashboard-host={host}",
            "--dashboard-port=0",
        ]
    if num_cpus is not None:
        cmd += [f"--num-cpus={num_cpus}"]
    if num_gpus is not None:
        cmd += [f"--num-gpus={num_gpus}"]
    if object_store_memory:
        cmd += [f"--object-store-memory={object_store_memory}"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise DopdError(f"`{' '.join(cmd)}` failed:\n{(res.stderr or res.stdout).strip()[-1500:]}")
    info = _read()
    info.update(address=address or f"{host}:{port}", role="worker" if address else "head", auth="token")
    if with_prometheus:
        from dopd import prometheus

        cfg_path = prometheus.write_config(state_dir() / "prometheus" / "prometheus.yml")
        proc = prometheus.start(cfg_path, state_dir() / "prometheus" / "data", host=host, port=prometheus_port)
        info["prometheus"] = {"url": f"http://{host}:{prometheus_port}", "pid": proc.pid, "config": str(cfg_path)}
    _write(info)
    return info


def down() -> list[str]:
    """Stop Prometheus (if `up` started one) and every Ray process of this machine; forget the address."""
    done = []
    info = _read()
    prom = info.get("prometheus")
    if prom:
        from dopd import prometheus

        prometheus.stop(prom["pid"])
        done.append(f"stopped Prometheus (pid {prom['pid']})")
    res = subprocess.run([_ray_bin(), "stop", "--force"], env=_env(), capture_output=True, text=True)
    done.append("stopped Ray" if res.returncode == 0 else f"ray stop: {res.stderr.strip()[-300:]}")
    (state_dir() / CLUSTER_FILE).unlink(missing_ok=True)
    return done


def status() -> dict:
    """Nodes, resources, dopd jobs (their named actors) and the Prometheus address."""
    info = _read()
    if not info.get("address"):
        raise DopdError("no cluster recorded: start one with `dopd cluster up` (dopd train alone uses an embedded Ray)")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    use_recorded_auth(info)
    join_cluster(info["address"])  # imports ray after the environment above: Ray's core reads it when loaded
    import ray

    try:
        nodes = [
            {"node": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n.get("Resources", {})}
            for n in ray.nodes()
        ]
        jobs: dict[str, dict] = {}
        try:
            from ray.util.state import list_actors

            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000):
                name = a.get("name") or ""
                if "." in name and name.split(".")[-2] in ("actor", "learner", "shard"):
                    job = name.rsplit(".", 2)[0]
                    kind = name.split(".")[-2]
                    jobs.setdefault(job, {"actor": 0, "learner": 0, "shard": 0})[kind] += 1
        except Exception as e:  # the state API needs the dashboard; say so rather than fail
            jobs = {"unavailable": {"reason": str(e)[:200]}}
        return {
            "address": info["address"],
            "role": info.get("role"),
            "auth": info.get("auth"),
            "nodes": nodes,
            "cluster_resources": ray.cluster_resources(),
            "available_resources": ray.available_resources(),
            "dopd_jobs": jobs,
            "prometheus": info.get("prometheus", {}).get("url"),
        }
    finally:
        ray.shutdown()
