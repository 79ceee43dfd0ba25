"""A local Prometheus for dopd jobs: config, scrape targets, start/stop and the two HTTP queries we need.

Why a real Prometheus and not our own scraper: the dashboards are PromQL, so the only honest test that a panel shows
data is to run its expression through Prometheus. Why file_sd: every dopd job writes one small JSON file with its
/metrics address into `prom_targets_dir()`, and a Prometheus started once keeps finding jobs as they come and go,
with no reload. Ray's own metrics come the same way, from the service-discovery file Ray's dashboard writes.

It listens on loopback only: Prometheus has no authentication and `--web.enable-lifecycle` lets anyone who can
reach it shut it down. Queries use urllib, so this adds no dependency.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from dopd.common.errors import DopdError
from dopd.paths import prom_targets_dir

RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # a symlink Ray's dashboard keeps pointing at the session
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def find_binary() -> str:
    """Path of the `prometheus` executable (`DOPD_PROMETHEUS` overrides PATH, e.g. for an unpacked release tarball)."""
    explicit = os.environ.get("DOPD_PROMETHEUS")
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            raise DopdError(f"DOPD_PROMETHEUS={explicit} is not an executable file")
        return explicit
    found = shutil.which("prometheus")
    if found is None:
        raise DopdError(
            "Prometheus is not installed: apt-get install prometheus (or set DOPD_PROMETHEUS to the binary)"
        )
    return found


def write_config(
    path: str | Path,
    scrape_interval: str = "2s",
    targets_dir: str | Path | None = None,
    ray_sd_file: str | Path = RAY_SD_FILE,
) -> Path:
    """Write prometheus.yml: job `dopd` from `targets_dir/*.json` (default `prom_targets_dir()`), job `ray` from Ray.

    The scrape interval is short because training runs are minutes long and `rate()` needs two samples in its window;
    scrape_timeout is left out so Prometheus clamps it to the interval (a larger timeout is a config error).
    Missing SD files are fine: Prometheus watches the paths and picks them up when they appear.
    """
    targets = Path(targets_dir) if targets_dir is not None else prom_targets_dir()
    cfg = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": "dopd", "file_sd_configs": [{"files": [str(targets / "*.json")], "refresh_interval": "5s"}]},
            {"job_name": "ray", "file_sd_configs": [{"files": [str(ray_sd_file)], "refresh_interval": "5s"}]},
        ],
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(p, yaml.safe_dump(cfg, sort_keys=False))
    return p


def register_job_target(
    job_name: str, host: str, port: int, labels: dict[str, str] | None = None, targets_dir: str | Path | None = None
) -> Path:
    """Announce a job's /metrics endpoint: write `prom_targets_dir()/<job_name>.json` (Prometheus file_sd format).

    The Prometheus `job` label stays "dopd" (the scrape job's name, which the dashboards' `$job` variable selects);
    the job's own name goes into a `dopd_job` label so concurrent runs stay apart. A wildcard listen address is
    written as 127.0.0.1: a local Prometheus cannot scrape "0.0.0.0".
    """
    if not _JOB_NAME.match(job_name):
        raise DopdError(f"job name {job_name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    group = [{"targets": [addr], "labels": {"dopd_job": job_name, **(labels or {})}}]
    tdir = Path(targets_dir) if targets_dir is not None else prom_targets_dir()
    tdir.mkdir(parents=True, exist_ok=True)
    path = tdir / f"{job_name}.json"
    _drop_stale_targets(addr, keep=path)
    _atomic_write(path, json.dumps(group, indent=2) + "\n")
    return path


def _drop_stale_targets(addr: str, keep: Path) -> None:
    """Remove other jobs' target files for this same address: a job killed before it could unregister leaves one
    behind, and since two live jobs cannot listen on one port, that file now names this job under its old
    `dopd_job` label, so every series would be scraped twice."""
    for other in keep.parent.glob("*.json"):
        if other == keep:
            continue
        try:
            groups = json.loads(other.read_text())
            stale = any(addr in g.get("targets", []) for g in groups)
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # not ours to judge
        if stale:
            other.unlink(missing_ok=True)


def unregister_job_target(job_name: str, targets_dir: str | Path | None = None) -> None:
    """Remove the job's target file (Prometheus drops the target within the file_sd refresh); missing is fine."""
    tdir = Path(targets_dir) if targets_dir is not None else prom_targets_dir()
    (tdir / f"{job_name}.json").unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temp file + rename so a watcher never reads half a file.

    The temp name ends in `.tmp`, not `.json`, so the `*.json` file_sd glob never matches it. The file is made
    world-readable (mkstemp creates 0600) because a containerised Prometheus runs as another user.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def start(
    config_path: str | Path,
    data_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 9090,
    timeout: float = 30.0,
    retention: str = "15d",
) -> subprocess.Popen:
    """Start Prometheus and wait until /-/ready answers; its output goes to `<data_dir>/../prometheus.log`.

    Raises DopdError with the end of that log when it exits early (bad config, port taken) or is not ready in time.
    """
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    log_path = data.parent / "prometheus.log"
    cmd = [
        find_binary(),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data}",
        f"--storage.tsdb.retention.time={retention}",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DopdError(f"Prometheus exited with code {proc.returncode} before it was ready:\n{_tail(log_path)}")
        if ready(url):
            return proc
        time.sleep(0.2)
    stop(proc)
    raise DopdError(f"Prometheus was not ready at {url}/-/ready after {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def ready(url: str) -> bool:
    """True once Prometheus has loaded its TSDB and config and serves queries."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/-/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc_or_pid: subprocess.Popen | int, timeout: float = 10.0) -> None:
    """SIGTERM (Prometheus flushes its head block and exits cleanly), SIGKILL if it is still there after `timeout`."""
    if isinstance(proc_or_pid, subprocess.Popen):
        if proc_or_pid.poll() is not None:
            return
        proc_or_pid.terminate()
        try:
            proc_or_pid.wait(timeout)
        except subprocess.TimeoutExpired:
            proc_or_pid.kill()
            proc_or_pid.wait()
        return
    pid = int(proc_or_pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _api(url: str, endpoint: str, params: dict[str, Any]) -> Any:
    full = f"{url.rstrip('/')}/api/v1/{endpoint}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(full, timeout=15) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON error naming the PromQL problem
        try:
            body = json.load(e)
        except ValueError:
            raise DopdError(f"Prometheus {endpoint} failed: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DopdError(f"cannot reach Prometheus at {url}: {e}") from None
    if body.get("status") != "success":
        raise DopdError(f"Prometheus {endpoint} failed for {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query: the `result` list (`{"metric": {...}, "value": [ts, "v"]}` per series; scalars wrapped)."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    data = _api(url, "query", params)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def query_range(url: str, expr: str, start: float, end: float, step: float | str) -> list[dict[str, Any]]:
    """Range query: the `result` matrix (`{"metric": {...}, "values": [[ts, "v"], ...]}` per series)."""
    return _api(url, "query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]


def label_values(url: str, label: str, match: str | None = None) -> list[str]:
    """Values of `label` (optionally among series matching `match`): what Grafana's label_values() variables see."""
    params = {"match[]": match} if match else {}
    return _api(url, f"label/{urllib.parse.quote(label)}/values", params)
