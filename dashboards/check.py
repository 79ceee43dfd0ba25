"""Which dashboard panels show nothing? Run every panel's PromQL through a live Prometheus.

Used by the synthetic live test and by the end-to-end test with a real training job: a panel whose expression
returns no series would be an empty box in Grafana, which is the failure this catches (a renamed label, a metric the
job stopped updating, a typo in a selector). A PromQL error counts as missing too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from dopd.common.errors import DopdError
from dopd.dashboards.queries import expand_variables, load, panel_queries
from dopd.prometheus import label_values, query

_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)$")


def missing_panels(
    prom_url: str,
    dashboards_dir: str | Path,
    job: str = "dopd",
    actor: str = ".*",
    rate_interval: str = "15s",
    at: float | None = None,
    files: Iterable[str] | None = None,
) -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expanded expression) for every query that returns no series at time `at`
    (unix seconds; default now: a job that has ended and unregistered its target has no series now).

    `files`: which dashboards (file names in `dashboards_dir`; default all): a training job feeds no serving panel."""
    missing = []
    for path in _paths(dashboards_dir, files):
        dash = load(path)
        for title, expr in panel_queries(dash):
            concrete = expand_variables(expr, job=job, actor=actor, rate_interval=rate_interval)
            try:
                empty = not query(prom_url, concrete, at)
            except DopdError:
                empty = True
            if empty:
                missing.append((dash["title"], title, concrete))
    return missing


def _paths(dashboards_dir: str | Path, files: Iterable[str] | None) -> list[Path]:
    d = Path(dashboards_dir)
    return sorted(d.glob("*.json")) if files is None else [d / f for f in files]


def missing_variables(
    prom_url: str, dashboards_dir: str | Path, job: str = "dopd", files: Iterable[str] | None = None
) -> list[tuple[str, str, str]]:
    """(dashboard title, variable name, query) for every label_values() variable that would offer no choices."""
    missing = []
    for path in _paths(dashboards_dir, files):
        dash = load(path)
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(q.strip())
            if m is None:
                raise ValueError(f"{dash['title']}: variable {var['name']} is not a label_values() query: {q}")
            match = expand_variables(m["match"], job=job) if m["match"] else None
            try:
                values = label_values(prom_url, m["label"], match)
            except DopdError:
                values = []
            if not values:
                missing.append((dash["title"], var["name"], q))
    return missing
