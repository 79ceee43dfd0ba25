"""Reading the committed dashboard JSON: its panels' PromQL, with Grafana's variables filled in.

Kept apart from build.py so the checker, the renderer and the end-to-end tests need only the JSON, not
grafana-foundation-sdk (which only generating the dashboards requires).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # where the generated dashboards live (and are packaged)
DASHBOARD_FILES = ("training_overview.json", "rollout_fleet.json", "serving.json")
TRAINING_FILES = DASHBOARD_FILES[:2]  # what a `dopd train` job feeds (serving.json: `dopd serve`)


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, depth first: collapsed rows keep their panels inside the row."""
    for p in panels:
        yield p
        yield from walk(p.get("panels") or [])


def panel_queries(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel, rows' nested panels included."""
    out = []
    for p in walk(dashboard_json.get("panels", [])):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append((p["title"], t["expr"]))
    return out


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def expand_variables(
    expr: str, job: str = "dopd", actor: str = ".*", rate_interval: str = "15s", replica: str = ".*"
) -> str:
    """Substitute Grafana's template variables the way Grafana would, so Prometheus can run the expression.

    `$job` / `$actor` / `$replica` are regex-matched (=~) in every panel, so the values are regexes. `$__rate_interval` becomes a
    fixed window; keep it at least 4x the scrape interval so rate() always has two samples. An unknown variable is
    an error rather than left in place, so a typo in a panel fails the tests.
    """
    values = {
        "job": job,
        "actor": actor,
        "replica": replica,
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": rate_interval,
    }

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VAR.sub(sub, expr)
