"""Joining Ray: the recorded/configured cluster, or an embedded local Ray on loopback.

One module, imported by both the job (`dopd.driver`) and `dopd cluster` (status joins the head it recorded), so the
loopback and authentication rules are written once. Everything here must run BEFORE `import ray` where noted: Ray's
core reads RAY_AUTH_MODE and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is loaded.
"""

from __future__ import annotations

import json
import os

from dopd.common.config import Config

CLUSTER_FILE = "cluster.json"


def _env() -> dict:
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def cluster_address(cfg: Config) -> str | None:
    """The configured address, else the one `dopd cluster up` recorded, else None (embedded Ray)."""
    if cfg.cluster.address:
        return cfg.cluster.address
    from dopd.paths import state_dir

    f = state_dir() / CLUSTER_FILE
    if f.is_file():
        try:
            info = json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
        use_recorded_auth(info)
        return info.get("address")
    return None


def use_recorded_auth(info: dict) -> None:
    """A head `dopd cluster up` started wants the token (in ~/.ray/auth_token, or the file `dopd cluster join
    --token-file` named: its path goes to RAY_AUTH_TOKEN_PATH, the token itself nowhere); call before `import ray`."""
    if info.get("auth") == "token":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if info.get("token_file"):
            os.environ.setdefault("RAY_AUTH_TOKEN_PATH", info["token_file"])


def is_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, ray://host:port) names this machine's loopback interface."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def keep_ray_on_loopback() -> None:
    """Make this process's Ray resolve "127.0.0.1" to itself when it joins a loopback-only head.

    Ray rewrites a loopback bootstrap address to the machine's primary IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    which it reads once, when `ray` is first imported; a loopback head does not listen there. Only for loopback
    addresses: a driver joining a remote head must keep its routable IP.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set


def join_cluster(address: str, **init_kwargs) -> None:
    """`ray.init` at a running cluster. Ray rewrites a loopback bootstrap address to this node's primary IP, where a
    loopback-only head does not listen; pinning the driver's node address keeps it on 127.0.0.1."""
    local = {}
    if is_loopback(address):
        keep_ray_on_loopback()
        local = {"_node_ip_address": "127.0.0.1"}
    import ray

    ray.init(address=address, namespace="dopd", log_to_driver=False, **init_kwargs, **local)


def connect(cfg: Config, env: dict[str, str] | None = None) -> str:
    """Join the recorded/configured cluster or start an embedded local Ray (loopback only).

    The embedded Ray is told this machine's real CPU count (affinity and cgroup quota; dopd/plan.py): a plan with
    more processes than cores asks for fractional CPUs instead of pretending the cores exist. `env`: variables
    every worker of this job gets (the plan's thread budget)."""
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    address = cluster_address(cfg)  # before `import ray`: Ray's core reads RAY_AUTH_MODE when it is loaded
    import ray

    if ray.is_initialized():
        return "existing"
    extra = {**_env(), "DOPD_CACHE": os.environ.get("DOPD_CACHE", ""), **(env or {})}
    runtime_env = {"env_vars": {k: v for k, v in extra.items() if v}}
    if address:
        join_cluster(address, runtime_env=runtime_env)
        return address
    from dopd.plan import local_cpus

    ray.init(
        address="local",  # never join a cluster found in /tmp/ray or RAY_ADDRESS by accident: that one is configured
        num_cpus=local_cpus(),
        object_store_memory=cfg.cluster.object_store_memory,
        include_dashboard=False,
        namespace="dopd",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=False,
    )
    return "embedded"
