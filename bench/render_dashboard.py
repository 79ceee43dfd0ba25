"""Draw a dashboard's main panels to a PNG straight from Prometheus (no Grafana needed).

Why: a results write-up or a CI artifact needs a picture of the run, and running Grafana plus an image renderer for
that is heavy. This runs the same PromQL as the committed dashboard JSON (query_range over the chosen window) and
draws one matplotlib subplot per time-series panel, one line per series, legends from the panel's legendFormat.
Acceptance-by-position heatmaps are drawn as heatmaps (rows = block positions).

    python bench/render_dashboard.py --prom-url http://127.0.0.1:9090 --since 30m --out docs/dashboard_overview.png
"""

from __future__ import annotations

import argparse
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dopd.dashboards.queries import HERE, expand_variables, load, walk  # noqa: E402
from dopd.prometheus import query_range  # noqa: E402

UNIT_LABELS = {"s": "seconds", "percentunit": "fraction", "flops": "FLOP/s", "bytes": "bytes", "short": ""}


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d' -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h)")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def main_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels drawn over time: time series, and heatmaps whose series are not histogram buckets.

    Stats and bar gauges show the latest value of a query a time-series panel already plots; histogram-bucket
    heatmaps are summarised by the quantile panels.
    """
    out = []
    for p in walk(dash["panels"]):
        if (
            p["type"] == "timeseries"
            or p["type"] == "heatmap"
            and all(t.get("format") != "heatmap" for t in p.get("targets", []))
        ):
            out.append(p)
    return out


def legend(fmt: str | None, metric: dict[str, str]) -> str:
    if fmt:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m[1], ""), fmt)
    labels = ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k not in ("job", "instance"))
    return labels or metric.get("__name__", "value")


def fetch(
    url: str, panel: dict[str, Any], start: float, end: float, step: float, job: str, actor: str, rate_interval: str
) -> list[tuple[str, list[float], list[float]]]:
    """(legend, timestamps, values) for every series of every query of the panel."""
    series = []
    for t in panel.get("targets", []):
        expr = expand_variables(t["expr"], job=job, actor=actor, rate_interval=rate_interval)
        for r in query_range(url, expr, start, end, step):
            ts = [float(x) for x, _ in r["values"]]
            vs = [float(v) for _, v in r["values"]]  # "NaN" / "+Inf" parse as floats
            series.append((legend(t.get("legendFormat"), r["metric"]), ts, vs))
    return series


def _numeric_key(name: str) -> tuple[float, str]:
    try:
        return (float(name), name)
    except ValueError:
        return (math.inf, name)


def draw(ax: Any, panel: dict[str, Any], series: list[tuple[str, list[float], list[float]]]) -> None:
    ax.set_title(panel["title"], fontsize=10)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    if not series:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    if panel["type"] == "heatmap":
        series = sorted(series, key=lambda s: _numeric_key(s[0]))
        times = sorted({t for _, ts, _ in series for t in ts})
        col = {t: i for i, t in enumerate(times)}
        grid = [[math.nan] * len(times) for _ in series]
        for row, (_, ts, vs) in enumerate(series):
            for t, v in zip(ts, vs):
                grid[row][col[t]] = v
        x = [datetime.fromtimestamp(t) for t in times]
        mesh = ax.pcolormesh(
            x,
            range(len(series)),
            grid,
            shading="nearest",
            cmap="Greens",
            vmin=0,
            vmax=1 if unit == "percentunit" else None,
        )
        ax.set_yticks(range(len(series)), [s[0] for s in series])
        ax.set_ylabel(panel.get("options", {}).get("yAxis", {}).get("axisLabel", ""))
        ax.figure.colorbar(mesh, ax=ax, fraction=0.04)
    else:
        for name, ts, vs in series:
            ax.plot([datetime.fromtimestamp(t) for t in ts], vs, label=name, linewidth=1)
        ax.set_ylabel(UNIT_LABELS.get(unit, unit))
        ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def render(
    url: str,
    dashboard: Path,
    out: Path,
    start: float,
    end: float,
    step: float | None = None,
    job: str = "dopd",
    actor: str = ".*",
    rate_interval: str = "15s",
    cols: int = 2,
) -> Path:
    """Query every main panel over [start, end] and write the PNG; returns its path."""
    dash = load(dashboard)
    panels = main_panels(dash)
    step = step or max(1.0, (end - start) / 300)  # ~300 points per line
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        draw(ax, panel, fetch(url, panel, start, end, step, job, actor, rate_interval))
    fig.autofmt_xdate()  # every panel spans the same window: time labels on the bottom row only
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    stamp = f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} - {datetime.fromtimestamp(end):%H:%M:%S}"
    fig.suptitle(f"{dash['title']} ({stamp}, job=~{job})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prom-url", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=HERE / "training_overview.json")
    ap.add_argument("--since", type=parse_duration, default=parse_duration("30m"), help="window ending at --end")
    ap.add_argument("--start", type=float, help="unix seconds (overrides --since)")
    ap.add_argument("--end", type=float, help="unix seconds (default: now)")
    ap.add_argument("--step", type=float, help="seconds between points (default: window / 300)")
    ap.add_argument("--job", default="dopd", help="regex for the job label, as the dashboard's Job variable")
    ap.add_argument("--actor", default=".*", help="regex for the actor label")
    ap.add_argument("--rate-interval", default="15s", help="window for rate(); >= 4x the scrape interval")
    ap.add_argument("--out", type=Path, default=Path("docs/dashboard_overview.png"))
    ap.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores: one query range, as without it")
    args = ap.parse_args(argv)
    from dopd.common.hardware import bench_start

    bench_start(args, None)
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.since
    path = render(
        args.prom_url, args.dashboard, args.out, start, end, args.step, args.job, args.actor, args.rate_interval
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
