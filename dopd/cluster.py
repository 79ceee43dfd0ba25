"""`dopd cluster up|join|down|status`: a Ray head (or a worker joining one) on loopback unless told otherwise.

`up` starts `ray start --head` with its ports on 127.0.0.1, Ray's token authentication on (the token lives in
~/.ray/auth_token; clients on this machine find it there), and records the address in ~/.dopd/cluster.json, where
`dopd train` finds it; `--with-prometheus` also starts a local Prometheus that scrapes dopd jobs and Ray. `join`
starts a worker node of a head elsewhere, the token read from a file and handed to Ray in its environment
(RAY_AUTH_TOKEN), never on a command line or in a log. Each node `up` or `join` starts gets its own Ray temp
directory, so its processes can be told from any other Ray on the machine: their ids and start times are recorded
in cluster.json, and `down` stops those (and their children) only, never another user's or another job's Ray
(`ray stop --force` stops every Ray process of the machine). `status` lists nodes, their resources and used share,
running dopd jobs and the Prometheus address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dopd.common.errors import DopdError
from dopd.paths import state_dir

from .connection import CLUSTER_FILE, is_loopback, join_cluster, use_recorded_auth

# `ray start` for a worker of a loopback head: Ray refuses a worker node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1,
# and with it set rewrites the head's 127.0.0.1 to this machine's primary IP, where a loopback head does not listen
# (the same rewrite dopd/connection.py keep_ray_on_loopback stops for drivers). This runs Ray's own CLI with that
# rewrite turned off for loopback hosts only.
_LOOPBACK_RAY = (
    "import sys\n"
    "import ray._private.services as s\n"
    "_resolve = s.resolve_ip_for_localhost\n"
    "s.resolve_ip_for_localhost = lambda h: h if s.is_localhost(h) else _resolve(h)\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


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


def node_temp_dir(tag: str) -> Path:
    """This node's own Ray temp directory (short: Ray puts unix sockets under it, ~107 characters at most)."""
    return Path("/tmp") / f"dopd-ray-{os.getuid()}-{tag}"


def processes_under(temp_dir: Path) -> list[dict]:
    """The Ray daemons whose command line names `temp_dir` (Ray passes every daemon its session or log directory
    there): pid, start time (tells a reused pid apart) and name."""
    import psutil

    key = str(temp_dir)
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time", "name"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if key in cmd and p.pid != os.getpid():
            scripts = [Path(a).name for a in p.info["cmdline"] if a.endswith(".py")]  # python daemons: their script
            name = scripts[0] if scripts else p.info["name"]
            out.append({"pid": p.pid, "create_time": p.info["create_time"], "name": name})
    return out


def _start(cmd: list[str], env: dict, temp_dir: Path, what: str) -> list[dict]:
    temp_dir.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(cmd + [f"--temp-dir={temp_dir}"], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise DopdError(f"`{' '.join(cmd)}` failed ({what}):\n{(res.stderr or res.stdout).strip()[-1500:]}")
    procs = processes_under(temp_dir)
    if not procs:
        raise DopdError(f"`ray start` reported success but no Ray process runs under {temp_dir}")
    return procs


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _node_flags(
    num_cpus, num_gpus, object_store_memory, resources: dict | None, labels: dict | None, host: str = "127.0.0.1"
) -> list[str]:
    """The node's resources, and free ports for its agents: Ray's fixed defaults (52365 for the dashboard agent)
    collide with any other Ray node on this machine, another user's or this cluster's head."""
    cmd = [
        f"--dashboard-agent-listen-port={_free_port(host)}",
        f"--dashboard-agent-grpc-port={_free_port(host)}",
        f"--metrics-export-port={_free_port(host)}",
        f"--runtime-env-agent-port={_free_port(host)}",
    ]
    if num_cpus is not None:
        cmd += [f"--num-cpus={num_cpus}"]
    if num_gpus is not None:
        cmd += [f"--num-gpus={num_gpus}"]
    if object_store_memory:
        cmd += [f"--object-store-memory={object_store_memory}"]
    if resources:
        cmd += [f"--resources={json.dumps(resources)}"]
    if labels:
        cmd += ["--labels=" + ",".join(f"{k}={v}" for k, v in labels.items())]
    return cmd


def _ensure_token(env: dict) -> None:
    """A head with token auth needs a token before it starts: Ray's own `ray get-auth-token --generate` writes
    ~/.ray/auth_token when there is none (its stdout, the token, is discarded, never printed)."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token").is_file():
        return
    res = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise DopdError(f"could not create Ray's auth token (~/.ray/auth_token): {res.stderr.strip()[-300:]}")


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
    """Start a head (no address) or join `address` (the token from ~/.ray/auth_token); returns what was recorded
    in cluster.json: the address, and the processes this call started."""
    if address:
        return join(address, None, num_cpus, num_gpus, host, object_store_memory)
    if _read().get("processes"):
        raise DopdError("`dopd cluster up` already started a node here (see `dopd cluster status`; `down` first)")
    cmd = [_ray_bin(), "start", "--disable-usage-stats", f"--node-ip-address={host}", "--head", f"--port={port}"]
    cmd += ["--include-dashboard=true", f"--dashboard-host={host}", "--dashboard-port=0"]
    cmd += _node_flags(num_cpus, num_gpus, object_store_memory, None, None, host)
    cmd += [f"--ray-client-server-port={_free_port(host)}"]
    temp = node_temp_dir(str(port))
    env = _env()
    if env.get("RAY_AUTH_MODE") == "token":
        _ensure_token(env)
    procs = _start(cmd, env, temp, "head")
    info = {"address": f"{host}:{port}", "role": "head", "auth": "token", "temp_dir": str(temp), "processes": procs}
    if with_prometheus:
        from dopd import prometheus

        # Ray's dashboard writes its service-discovery file into this node's own temp dir (not /tmp/ray)
        sd = temp / "prom_metrics_service_discovery.json"
        cfg_path = prometheus.write_config(state_dir() / "prometheus" / "prometheus.yml", ray_sd_file=sd)
        proc = prometheus.start(cfg_path, state_dir() / "prometheus" / "data", host=host, port=prometheus_port)
        info["prometheus"] = {"url": f"http://{host}:{prometheus_port}", "pid": proc.pid, "config": str(cfg_path)}
    _write(info)
    return info


def join(
    address: str,
    token_file: Path | None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    host: str = "127.0.0.1",
    object_store_memory: int | None = None,
    resources: dict | None = None,
    labels: dict | None = None,
) -> dict:
    """Start a worker node of the head at `address`. The token is read from `token_file` and given to `ray start`
    in RAY_AUTH_TOKEN (Ray's token variable; its daemons inherit it), never on argv; cluster.json records the
    file's path, not the token, so `dopd train` here authenticates the same way."""
    if _read().get("processes"):
        raise DopdError("`dopd cluster up/join` already started a node here (see `dopd cluster status`; `down` first)")
    env = _env()
    # `ray start --address` refuses to start a worker node while this is 0 (its "single-node only" switch); the
    # node still binds the address given (--node-ip-address), so a loopback worker stays on loopback
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    if token_file is not None:
        token_file = Path(token_file).expanduser().resolve()
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise DopdError(f"--token-file {token_file}: {e.strerror}") from None
        if not token:
            raise DopdError(f"--token-file {token_file} is empty")
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    ray_cmd = [_ray_bin()]
    if is_loopback(address):
        ray_cmd = [sys.executable, "-c", _LOOPBACK_RAY]
    cmd = ray_cmd + ["start", "--disable-usage-stats", f"--node-ip-address={host}", f"--address={address}"]
    cmd += _node_flags(num_cpus, num_gpus, object_store_memory, resources, labels, host)
    temp = node_temp_dir(f"w{int(time.time() * 1000) % 10**9}")
    procs = _start(cmd, env, temp, "worker")
    info = {"address": address, "role": "worker", "auth": "token", "temp_dir": str(temp), "processes": procs}
    if token_file is not None:
        info["token_file"] = str(token_file)
    _write(info)
    return info


def _alive(rec: dict):
    """The recorded process if it still runs (same pid and same start time), else None."""
    import psutil

    try:
        p = psutil.Process(rec["pid"])
        return p if abs(p.create_time() - rec["create_time"]) < 0.01 else None
    except psutil.Error:
        return None


def down(timeout_s: float = 15.0) -> list[str]:
    """Stop Prometheus (if `up` started one) and the Ray processes `up` / `join` started (and their children, the
    workers); nothing else. Forget the address."""
    import psutil

    done = []
    info = _read()
    prom = info.get("prometheus")
    if prom:
        from dopd import prometheus

        prometheus.stop(prom["pid"])
        done.append(f"stopped Prometheus (pid {prom['pid']})")
    recorded = info.get("processes", [])
    ours = [p for p in (_alive(r) for r in recorded) if p is not None]
    children = []
    for p in ours:
        try:
            children += p.children(recursive=True)
        except psutil.Error:
            pass
    targets = {p.pid: p for p in ours + children}
    for p in targets.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(list(targets.values()), timeout=timeout_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    if recorded:
        gone = len(recorded) - len(ours)
        done.append(
            f"stopped {len(ours)} Ray process(es) this machine's `dopd cluster up/join` started"
            + (f" and {len(children)} of their workers" if children else "")
            + (f"; {gone} had already exited" if gone else "")
        )
    else:
        done.append("no Ray processes recorded: nothing of Ray stopped (only what `dopd cluster up` starts is)")
    temp = info.get("temp_dir")
    if temp and Path(temp).name.startswith("dopd-ray-"):
        shutil.rmtree(temp, ignore_errors=True)
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
        from ray._private import state as ray_state

        try:
            free = ray_state.available_resources_per_node()
        except Exception:  # an older or newer Ray without it: the cluster's totals below still say it
            free = {}
        nodes = []
        for n in ray.nodes():
            total, avail = n.get("Resources", {}), free.get(n["NodeID"], {})
            used = {
                k: round(1 - avail.get(k, 0) / v, 3) for k, v in total.items() if v and k in ("CPU", "GPU", "memory")
            }
            nodes.append(
                {"node_id": n["NodeID"], "node": n["NodeManagerAddress"], "alive": n["Alive"], "resources": total}
                | ({"used_share": used} if n["Alive"] and free else {})
            )
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
            "started_here": [{"pid": r["pid"], "name": r["name"]} for r in info.get("processes", []) if _alive(r)],
        }
    finally:
        ray.shutdown()
