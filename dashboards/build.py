"""The three Grafana dashboards, as code: `python -m dopd.dashboards.build [--check]`.

Training overview and rollout fleet read a `dopd train` job's endpoint; serving reads `dopd serve`'s replicas (and,
with `--learn`, the learning job's). Why code and not hand-edited JSON: every metric name comes from
`dopd.metrics.METRICS` / `SERVE_METRICS` (through `_s`), so a
panel cannot name a series the job does not export, and `--check` (run by the tests) fails when the committed JSON
drifts from this file. The JSON is written by grafana-foundation-sdk, the builder Grafana publishes from its own
schema, pinned in pyproject.toml (the `dashboards` extra) because its versions are `<epoch>!<grafana version>` and an
unpinned install picks the Grafana 10.1 flavour:

    pip install 'grafana-foundation-sdk==1769699379!11.6.0'   # builds for Grafana 11.6

Every panel has an explicit id and grid position so that regenerating never moves panels a person has linked to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import heatmap as hm
from grafana_foundation_sdk.builders.bargauge import Panel as BarGauge
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.heatmap import Panel as Heatmap
from grafana_foundation_sdk.builders.prometheus import Dataquery as PromQuery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import heatmap as hm_models
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh, VariableSort
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from dopd.dashboards.queries import DASHBOARD_FILES, HERE, expand_variables, load, panel_queries, walk  # noqa: F401
from dopd.metrics import METRICS, SERVE_METRICS

OUTPUTS = dict(zip(DASHBOARD_FILES, ("training", "fleet", "serving")))

# Every panel, query and variable reads from the datasource *variable*, so one JSON works in any Grafana.
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'
ACTOR = 'job=~"$job", actor=~"$actor"'
REPLICA = 'job=~"$job", replica=~"$replica"'
RATE = "$__rate_interval"


def _s(name: str, suffix: str = "") -> str:
    """The PromQL series of metric `name` (KeyError for a metric the job does not export).

    Histograms must be read through `_bucket`, `_sum` or `_count`; anything else takes no suffix.
    """
    d = METRICS[name] if name in METRICS else SERVE_METRICS[name]
    allowed = ("_bucket", "_sum", "_count") if d.kind == "histogram" else ("",)
    if suffix not in allowed:
        raise ValueError(f"{name} is a {d.kind}: suffix must be one of {allowed}, not {suffix!r}")
    return d.series + suffix


def _q(expr: str, legend: str = "", ref: str = "A", fmt: PromQueryFormat | None = None) -> PromQuery:
    b = PromQuery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        b = b.legend_format(legend)
    if fmt is not None:
        b = b.format(fmt)
    return b


def _pos(x: int, y: int, w: int, h: int) -> GridPos:
    return GridPos(h=h, w=w, x=x, y=y)


def _legend() -> VizLegendOptions:
    return VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True)


def _ts(
    pid: int, title: str, pos: GridPos, targets: list[PromQuery], unit: str = "short", desc: str = ""
) -> Timeseries:
    p = Timeseries().id(pid).title(title).datasource(DS).grid_pos(pos).unit(unit).legend(_legend())
    p = p.line_width(1).fill_opacity(10)
    if desc:
        p = p.description(desc)
    for t in targets:
        p = p.with_target(t)
    return p


def _stat(pid: int, title: str, pos: GridPos, target: PromQuery, unit: str = "short", decimals: int = 2) -> Stat:
    return (
        Stat()
        .id(pid)
        .title(title)
        .datasource(DS)
        .grid_pos(pos)
        .with_target(target)
        .unit(unit)
        .decimals(decimals)
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.VALUE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def _bars(
    pid: int,
    title: str,
    pos: GridPos,
    target: PromQuery,
    unit: str = "short",
    lo: float | None = None,
    hi: float | None = None,
) -> BarGauge:
    p = (
        BarGauge()
        .id(pid)
        .title(title)
        .datasource(DS)
        .grid_pos(pos)
        .with_target(target)
        .unit(unit)
        .display_mode(BarGaugeDisplayMode.GRADIENT)
        .orientation(VizOrientation.VERTICAL)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if lo is not None:
        p = p.min(lo)
    if hi is not None:
        p = p.max(hi)
    return p


def _colors(scheme: str, fill: str, scale: hm_models.HeatmapColorScale) -> hm.HeatmapColorOptions:
    """Every colour field set: the SDK would otherwise write exponent 0 and an empty fill, which Grafana honours."""
    return (
        hm.HeatmapColorOptions()
        .mode(hm_models.HeatmapColorMode.SCHEME)
        .scheme(scheme)
        .fill(fill)
        .scale(scale)
        .exponent(0.5)
        .steps(64)
    )


def _row(pid: int, title: str, y: int) -> Row:
    return Row(title).id(pid).grid_pos(_pos(0, y, 24, 1))


def _quantiles(name: str, sel: str = JOB) -> list[PromQuery]:
    """p50/p90/p99 and the mean of a histogram over the rate window, summed over every label but `le`."""
    bucket = f"sum by (le) (rate({_s(name, '_bucket')}{{{sel}}}[{RATE}]))"
    out = [
        _q(f"histogram_quantile({q}, {bucket})", f"p{int(q * 100)}", ref)
        for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
    ]
    mean = f"sum(rate({_s(name, '_sum')}{{{sel}}}[{RATE}])) / sum(rate({_s(name, '_count')}{{{sel}}}[{RATE}]))"
    out.append(_q(mean, "mean", "D"))
    return out


def _multi(name: str, label: str, query: str, sort: VariableSort) -> QueryVariable:
    """A label_values() variable offering several values at once, All = `.*` (every panel matches it with =~)."""
    return (
        QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(sort)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def _variables(d: Dashboard, job_metric: str, member: str, member_metric: str) -> Dashboard:
    """`datasource`, `job` (label_values over a metric every such job exports) and the per-process label (`actor`
    of a training job, `replica` of a server)."""
    ds = DatasourceVariable("datasource").label("Data source").type("prometheus")
    job = _multi("job", "Job", f"label_values({_s(job_metric)}, job)", VariableSort.ALPHABETICAL_ASC)
    q = f"label_values({_s(member_metric)}{{{JOB}}}, {member})"
    return (
        d.with_variable(ds)
        .with_variable(job)
        .with_variable(_multi(member, member.title(), q, VariableSort.NUMERICAL_ASC))
    )


def _dashboard(title: str, uid: str, serving: bool = False) -> Dashboard:
    d = Dashboard(title).uid(uid).tags(["dopd"]).refresh("10s").time("now-30m", "now").timezone("browser")
    if serving:
        return _variables(d, "dopd_serve_policy_version", "replica", "dopd_serve_policy_version")
    return _variables(d, "dopd_policy_version", "actor", "dopd_rollout_tau")


def training_overview() -> Dashboard:
    """Is the drafter getting better? tau (held-out and per-actor rollout), per-position acceptance, the learner."""
    d = _dashboard("dopd training overview", "dopd-training-overview")
    return _add(d, [*_acceptance_panels(), *_learner_panels(), *_freshness_panels(), *_diagnostics_panels()])


def _acceptance_bars(pid: int, title: str, pos: GridPos, source: str) -> BarGauge:
    """The latest acceptance rate at each block position of one source (heldout, rollout, trained), 0..1."""
    expr = f'{_s("dopd_acceptance_rate")}{{{JOB}, source="{source}"}}'
    return _bars(pid, title, pos, _q(expr, "pos {{position}}"), "percentunit", 0, 1)


def _acceptance_panels() -> list[Any]:
    """Row 1 (ids 1-8): tau held-out and per actor, per-position acceptance as bars and over time."""
    return [
        _row(1, "Acceptance length", 0),
        _stat(2, "Held-out tau", _pos(0, 1, 4, 4), _q(f"max({_s('dopd_heldout_tau')}{{{JOB}}})")),
        _stat(3, "Rollout tau (mean over actors)", _pos(0, 5, 4, 4), _q(f"avg({_s('dopd_rollout_tau')}{{{ACTOR}}})")),
        _ts(
            4,
            "Acceptance length tau",
            _pos(4, 1, 20, 8),
            [
                _q(f"{_s('dopd_heldout_tau')}{{{JOB}}}", "held-out", "A"),
                _q(f"{_s('dopd_rollout_tau')}{{{ACTOR}}}", "rollout actor {{actor}}", "B"),
            ],
            desc="Tokens committed per verification step: held-out prompts (the number to report) and each actor's latest rollout batch.",
        ),
        _acceptance_bars(5, "Per-position acceptance (held-out)", _pos(0, 9, 12, 7), "heldout"),
        _acceptance_bars(6, "Per-position acceptance (rollout)", _pos(12, 9, 12, 7), "rollout"),
        _acceptance_heatmap(7, "Acceptance by position over time (held-out)", _pos(0, 16, 12, 8), "heldout"),
        _acceptance_heatmap(8, "Acceptance by position over time (rollout)", _pos(12, 16, 12, 8), "rollout"),
    ]


def _learner_panels() -> list[Any]:
    """Row 9 (ids 9-13): loss per stream, step time, FLOPs, steps/s and gradient norm."""
    return [
        _row(9, "Learner", 24),
        _ts(
            10, "Learner loss per stream", _pos(0, 25, 12, 8), [_q(f"{_s('dopd_learner_loss')}{{{JOB}}}", "{{stream}}")]
        ),
        _ts(11, "Learner step time", _pos(12, 25, 12, 8), _quantiles("dopd_learner_step_seconds"), "s"),
        _ts(
            12,
            "Learner FLOPs rate",
            _pos(0, 33, 12, 8),
            [
                _q(f"sum(rate({_s('dopd_learner_flops')}{{{JOB}}}[{RATE}]))", "FLOP/s"),
            ],
            "flops",
        ),
        _ts(
            13,
            "Learner steps/s and gradient norm",
            _pos(12, 33, 12, 8),
            [
                _q(f"sum(rate({_s('dopd_learner_steps')}{{{JOB}}}[{RATE}]))", "steps/s", "A"),
                _q(f"{_s('dopd_learner_grad_norm')}{{{JOB}}}", "grad norm (pre-clip)", "B"),
            ],
        ),
    ]


def _freshness_panels() -> list[Any]:
    """Row 14 (ids 14-18): policy version, record staleness, publish latency."""
    return [
        _row(14, "Policy freshness and publishing", 41),
        _ts(
            15,
            "Policy version",
            _pos(0, 42, 8, 8),
            [_q(f"max({_s('dopd_policy_version')}{{{JOB}}})", "policy version")],
        ),
        _ts(
            16,
            "Record staleness (policy versions)",
            _pos(8, 42, 8, 8),
            _quantiles("dopd_record_staleness"),
            desc="Policy versions between the actor that produced a record and the learner that trained on it.",
        ),
        _ts(
            17,
            "Publish latency",
            _pos(16, 42, 8, 8),
            _quantiles("dopd_publish_latency_seconds"),
            "s",
            desc="Gathering the new drafter weights and delivering them to every actor.",
        ),
        (
            Heatmap()
            .id(18)
            .title("Record staleness distribution")
            .datasource(DS)
            .grid_pos(_pos(0, 50, 24, 8))
            .with_target(
                _q(
                    f"sum by (le) (increase({_s('dopd_record_staleness', '_bucket')}{{{JOB}}}[{RATE}]))",
                    "{{le}}",
                    fmt=PromQueryFormat.HEATMAP,
                )
            )
            .calculate(False)
            .color(_colors("Oranges", "dark-orange", hm_models.HeatmapColorScale.EXPONENTIAL))
        ),
    ]


def _diagnostics_panels() -> list[Any]:
    """Row 19 (ids 19-23): gradient norm by part, silenced share, replay mismatch, acceptance of trained blocks."""
    return [
        _row(19, "Learner diagnostics", 58),
        _ts(
            20,
            "Gradient norm: own head vs body",
            _pos(0, 59, 8, 8),
            [
                _q(f"{_s('dopd_learner_grad_norm_part')}{{{JOB}}}", "{{part}}"),
            ],
            desc="Before clipping. A head shared by every block position is how a loss on one position moves the others.",
        ),
        _ts(
            21,
            "Silenced share per stream",
            _pos(8, 59, 8, 8),
            [
                _q(f"{_s('dopd_learner_silenced_share')}{{{JOB}}}", "{{stream}}"),
            ],
            "percentunit",
            desc="Positions whose gradient a floor, clip or the loss clamp sets to zero (verl's k3: confidently wrong drafts).",
        ),
        _ts(
            22,
            "Replay mismatch KL(drafter || target)",
            _pos(16, 59, 8, 8),
            [
                _q(f"{_s('dopd_replay_kl')}{{{JOB}}}", "{{group}}"),
            ],
            desc="Full-vocabulary KL at the rollout's block positions: matched (all), accepted, first rejected, after the rejection.",
        ),
        _acceptance_bars(23, "Per-position acceptance (blocks trained on)", _pos(0, 67, 24, 7), "trained"),
    ]


def _acceptance_heatmap(pid: int, title: str, pos: GridPos, source: str) -> Heatmap:
    """One heatmap row per block position, colour = acceptance rate.

    Time-series format, not Prometheus' `heatmap` format: that one sorts series by `le` and de-accumulates them,
    which is right for histogram buckets and wrong for rates that are not cumulative.
    """
    expr = f'{_s("dopd_acceptance_rate")}{{{JOB}, source="{source}"}}'
    return (
        Heatmap()
        .id(pid)
        .title(title)
        .datasource(DS)
        .grid_pos(pos)
        .with_target(_q(f"max by (position) ({expr})", "{{position}}"))
        .calculate(False)
        .unit("percentunit")
        .color(_colors("Greens", "dark-green", hm_models.HeatmapColorScale.LINEAR).min(0).max(1))
        .y_axis(hm.YAxisConfig().axis_label("block position"))
    )


def rollout_fleet() -> Dashboard:
    """Are the actors and queues healthy? Throughput per actor, restarts, queue shards, drops and record flow."""
    d = _dashboard("dopd rollout fleet", "dopd-rollout-fleet")
    return _add(d, [*_throughput_panels(), *_queue_panels()])


def _count(pid: int, title: str, x: int, expr: str) -> Stat:
    """A whole-number stat in the fleet dashboard's top line (6 columns wide at column x)."""
    return _stat(pid, title, _pos(x, 1, 6, 4), _q(expr), decimals=0)


def _throughput_panels() -> list[Any]:
    """Row 1 (ids 1-9): tokens/s in total and per actor, actors reporting, restarts, replay anchors/s."""
    tok_rate = f"rate({_s('dopd_rollout_tokens')}{{{ACTOR}}}[{RATE}])"
    return [
        _row(1, "Throughput", 0),
        _count(2, "Rollout tokens/s (all actors)", 0, f"sum({tok_rate})"),
        _count(3, "Actors reporting", 6, f"count({_s('dopd_rollout_tokens_per_second')}{{{ACTOR}}})"),
        _count(4, "Actor restarts (total)", 12, f"sum({_s('dopd_actor_restarts')}{{{ACTOR}}})"),
        _count(5, "Records queued (all shards)", 18, f"sum({_s('dopd_queue_depth')}{{{JOB}}})"),
        _ts(
            6,
            "Rollout tokens/s per actor (latest batch)",
            _pos(0, 5, 12, 8),
            [
                _q(f"{_s('dopd_rollout_tokens_per_second')}{{{ACTOR}}}", "actor {{actor}}"),
            ],
            desc="Each actor's own measurement of its last batch (gauge): spiky, but visible right after the first batch.",
        ),
        _ts(
            7,
            "Rollout tokens/s per actor (counter rate)",
            _pos(12, 5, 12, 8),
            [
                _q(f"sum by (actor) ({tok_rate})", "actor {{actor}}"),
            ],
            desc="rate() of the token counter: smooth, includes time spent outside rollout (publishing, replay).",
        ),
        _ts(
            8,
            "Replay anchors/s per actor",
            _pos(0, 13, 12, 8),
            [
                _q(
                    f"sum by (actor) (rate({_s('dopd_replay_anchors')}{{{ACTOR}}}[{RATE}]))",
                    "actor {{actor}} (counter rate)",
                    "A",
                ),
                _q(f"{_s('dopd_replay_anchors_per_second')}{{{ACTOR}}}", "actor {{actor}} (latest batch)", "B"),
            ],
        ),
        _ts(
            9,
            "Actor restarts",
            _pos(12, 13, 12, 8),
            [
                _q(f"{_s('dopd_actor_restarts')}{{{ACTOR}}}", "actor {{actor}}"),
            ],
            desc="Cumulative restarts per actor: a rising line is an actor that keeps dying.",
        ),
    ]


def _queue_panels() -> list[Any]:
    """Row 10 (ids 10-14): depth and bytes per shard, dropped / rejected records, records produced and consumed."""
    return [
        _row(10, "Queues", 21),
        _ts(
            11,
            "Queue depth per shard",
            _pos(0, 22, 12, 8),
            [_q(f"{_s('dopd_queue_depth')}{{{JOB}}}", "shard {{shard}}")],
        ),
        _ts(
            12,
            "Queue bytes per shard",
            _pos(12, 22, 12, 8),
            [_q(f"{_s('dopd_queue_bytes')}{{{JOB}}}", "shard {{shard}}")],
            "bytes",
        ),
        _ts(
            13,
            "Dropped and rejected records/s",
            _pos(0, 30, 12, 8),
            [
                _q(
                    f"sum by (shard) (rate({_s('dopd_records_dropped_stale')}{{{JOB}}}[{RATE}]))",
                    "stale, shard {{shard}}",
                    "A",
                ),
                _q(
                    f"sum by (shard) (rate({_s('dopd_records_dropped_full')}{{{JOB}}}[{RATE}]))",
                    "full, shard {{shard}}",
                    "B",
                ),
                _q(
                    f"sum by (shard) (rate({_s('dopd_records_rejected')}{{{JOB}}}[{RATE}]))",
                    "rejected, shard {{shard}}",
                    "C",
                ),
            ],
            desc="Stale: older than cluster.max_staleness. Full: dropped by a full shard's drop policy. Rejected: malformed.",
        ),
        _ts(
            14,
            "Records produced and consumed/s",
            _pos(12, 30, 12, 8),
            [
                _q(
                    f"sum by (actor) (rate({_s('dopd_records_produced')}{{{ACTOR}}}[{RATE}]))",
                    "produced, actor {{actor}}",
                    "A",
                ),
                _q(f"sum(rate({_s('dopd_records_produced')}{{{ACTOR}}}[{RATE}]))", "produced, total", "B"),
                _q(f"sum(rate({_s('dopd_records_consumed')}{{{JOB}}}[{RATE}]))", "consumed (learners)", "C"),
            ],
        ),
    ]


def serving() -> Dashboard:
    """Is the server fast, and is its drafter learning from the traffic? Live tau, latency, the learning side."""
    d = _dashboard("dopd serving", "dopd-serving", serving=True)
    return _add(d, [*_live_panels(), *_latency_panels(), *_learning_panels()])


def _serve_rate(name: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({_s(name)}{{{REPLICA}}}[{RATE}]))"


def _live_panels() -> list[Any]:
    """Row 1 (ids 1-7): tau on live traffic, per replica and overall, per-position acceptance, tokens/s, in flight."""
    steps = _serve_rate("dopd_serve_verification_steps")
    overall = f"1 + {_serve_rate('dopd_serve_accepted_drafts')} / {steps}"
    at_pos = f"{_serve_rate('dopd_serve_accepted_at_position', 'position')} / ignoring(position) group_left {steps}"
    return [
        _row(1, "Live traffic", 0),
        _stat(2, "Live tau (mean over replicas)", _pos(0, 1, 6, 4), _q(f"avg({_s('dopd_serve_tau')}{{{REPLICA}}})")),
        _stat(3, "Generated tokens/s", _pos(6, 1, 6, 4), _q(_serve_rate("dopd_serve_generated_tokens")), decimals=1),
        _stat(
            4,
            "Requests in flight",
            _pos(12, 1, 6, 4),
            _q(f"sum({_s('dopd_serve_in_flight')}{{{REPLICA}}})"),
            decimals=0,
        ),
        _stat(
            5,
            "Drafter version served (newest replica)",
            _pos(18, 1, 6, 4),
            _q(f"max({_s('dopd_serve_policy_version')}{{{REPLICA}}})"),
            decimals=0,
        ),
        _ts(
            6,
            "tau on live traffic",
            _pos(0, 5, 14, 8),
            [
                _q(f"{_s('dopd_serve_tau')}{{{REPLICA}}}", "replica {{replica}} (last 512 row-steps)", "A"),
                _q(overall, "all replicas (rate window)", "B"),
            ],
            desc="Tokens committed per verification step on the requests being served: what the drafter buys now.",
        ),
        _bars(
            7,
            "Share of steps accepting position i (live)",
            _pos(14, 5, 10, 8),
            _q(at_pos, "pos {{position}}"),
            "percentunit",
            0,
            1,
        ),
    ]


def _latency_panels() -> list[Any]:
    """Row 8 (ids 8-12): time to first token, per-token and request latency, requests/s by status."""
    sel = REPLICA
    return [
        _row(8, "Latency and requests", 13),
        _ts(9, "Time to first token", _pos(0, 14, 8, 8), _quantiles("dopd_serve_ttft_seconds", sel), "s"),
        _ts(
            10,
            "Per-token latency (after the first)",
            _pos(8, 14, 8, 8),
            _quantiles("dopd_serve_token_seconds", sel),
            "s",
        ),
        _ts(11, "Request latency", _pos(16, 14, 8, 8), _quantiles("dopd_serve_request_seconds", sel), "s"),
        _ts(
            12,
            "Requests/s by endpoint and status",
            _pos(0, 22, 24, 7),
            [_q(_serve_rate("dopd_serve_requests", "endpoint, status"), "{{endpoint}} {{status}}")],
            desc="4xx are refusals that name a limit (docs/serve.md); 429 = the replica's concurrent-request limit.",
        ),
    ]


def _learning_panels() -> list[Any]:
    """Row 13 (ids 13-17): `--learn`: versions served vs published, the learner's loss, the traffic's way to it."""
    return [
        _row(13, "Learning from the traffic (--learn)", 29),
        _ts(
            14,
            "Drafter version: published vs served",
            _pos(0, 30, 8, 8),
            [
                _q(f"max({_s('dopd_policy_version')}{{{JOB}}})", "published by the learners", "A"),
                _q(f"{_s('dopd_serve_policy_version')}{{{REPLICA}}}", "served by replica {{replica}}", "B"),
            ],
        ),
        _ts(
            15, "Learner loss per stream", _pos(8, 30, 8, 8), [_q(f"{_s('dopd_learner_loss')}{{{JOB}}}", "{{stream}}")]
        ),
        _ts(
            16,
            "Served requests to learning (/s)",
            _pos(16, 30, 8, 8),
            [
                _q(_serve_rate("dopd_serve_records_offered"), "offered by the replicas", "A"),
                _q(f"sum(rate({_s('dopd_traffic_taken')}{{{JOB}}}[{RATE}]))", "taken by the learning actors", "B"),
                _q(f"sum(rate({_s('dopd_traffic_dropped')}{{{JOB}}}[{RATE}]))", "dropped (feed full)", "C"),
            ],
            desc="Serving never waits for learning: a full feed drops the oldest served request and counts it here.",
        ),
        _ts(
            17,
            "Waiting: served requests and records",
            _pos(0, 38, 24, 7),
            [
                _q(f"max({_s('dopd_traffic_waiting')}{{{JOB}}})", "served requests in the feed", "A"),
                _q(f"sum({_s('dopd_queue_depth')}{{{JOB}}})", "records in the queue shards", "B"),
            ],
        ),
    ]


def _add(d: Dashboard, panels: list[Any]) -> Dashboard:
    for p in panels:
        d = d.with_row(p) if isinstance(p, Row) else d.with_panel(p)
    return d


DASHBOARDS = {"training": training_overview, "fleet": rollout_fleet, "serving": serving}


def render(which: str) -> str:
    """The dashboard's JSON text as committed: sorted keys, indent 2, trailing newline."""
    model = DASHBOARDS[which]().build()
    text = JSONEncoder(sort_keys=True, indent=2).encode(model) + "\n"
    _check_layout(json.loads(text))
    return text


def _check_layout(dash: dict[str, Any]) -> None:
    """Fail the build on duplicate ids or panels that overlap or leave the 24-column grid."""
    seen_ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        pid, g = p.get("id"), p["gridPos"]
        if not isinstance(pid, int) or pid <= 0 or pid in seen_ids:
            raise ValueError(f"{dash['title']}: panel {p.get('title')!r} has a missing or duplicate id {pid}")
        seen_ids.add(pid)
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            raise ValueError(f"{dash['title']}: panel {p['title']!r} leaves the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    raise ValueError(f"{dash['title']}: panel {p['title']!r} overlaps another at ({x}, {y})")
                cells.add((x, y))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dopd.dashboards.build", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the code")
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where the JSON files go (default: beside this file)")
    args = ap.parse_args(argv)
    stale = []
    for fname, which in OUTPUTS.items():
        text, path = render(which), args.out_dir / fname
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run `python -m dopd.dashboards.build`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
