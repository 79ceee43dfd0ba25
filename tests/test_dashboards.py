"""The generated dashboards: committed JSON is current, and every query names only series the job exports."""

from __future__ import annotations

import json
import re

import pytest

from dopd.dashboards import build
from dopd.dashboards.build import HERE, OUTPUTS, expand_variables, panel_queries
from dopd.metrics import METRICS, SERVE_METRICS

ALL_METRICS = {**METRICS, **SERVE_METRICS}

SERIES_RE = re.compile(r"\bdopd_[a-z_]+")


def known_series() -> dict[str, str]:
    """series name -> metric name, for every series PromQL may use (histograms only via _bucket/_sum/_count)."""
    out = {}
    for d in ALL_METRICS.values():
        if d.kind == "histogram":
            out.update({d.name + sfx: d.name for sfx in ("_bucket", "_sum", "_count")})
        else:
            out[d.series] = d.name
    return out


def unknown_series(expr: str) -> list[str]:
    known = known_series()
    return [s for s in SERIES_RE.findall(expr) if s not in known]


def dashboards() -> dict[str, dict]:
    return {name: json.loads((HERE / name).read_text()) for name in OUTPUTS}


def panels(dash: dict) -> list[dict]:
    return list(build.walk(dash["panels"]))


def test_committed_json_is_regenerated_output(tmp_path):
    assert build.main(["--check"]) == 0, "run `python -m dopd.dashboards.build` and commit the JSON"
    assert build.main(["--out-dir", str(tmp_path)]) == 0
    for name in OUTPUTS:
        text = (tmp_path / name).read_text()
        assert text == (HERE / name).read_text()
        assert text.endswith("}\n") and text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_check_mode_detects_drift(tmp_path, capsys):
    build.main(["--out-dir", str(tmp_path)])
    p = tmp_path / "rollout_fleet.json"
    p.write_text(p.read_text().replace("dopd rollout fleet", "edited by hand"))
    assert build.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert "rollout_fleet.json" in capsys.readouterr().err


def test_series_check_catches_unknown_names():
    assert unknown_series('rate(dopd_rollout_tokens_total{job=~"$job"}[5m])') == []
    assert unknown_series("dopd_rollout_tokens") == ["dopd_rollout_tokens"]  # a counter without _total
    assert unknown_series("dopd_learner_step_seconds") == ["dopd_learner_step_seconds"]  # a bare histogram
    assert unknown_series("dopd_learner_step_seconds_bucket + dopd_no_such_metric") == ["dopd_no_such_metric"]


def test_series_helper_rejects_unknown_metrics_and_suffixes():
    with pytest.raises(KeyError):
        build._s("dopd_no_such_metric")
    with pytest.raises(ValueError):
        build._s("dopd_learner_step_seconds")
    with pytest.raises(ValueError):
        build._s("dopd_heldout_tau", "_bucket")
    assert build._s("dopd_actor_restarts") == "dopd_actor_restarts_total"


def test_every_expression_references_only_exported_series():
    checked = 0
    for name, dash in dashboards().items():
        queries = panel_queries(dash)
        assert queries, name
        for title, expr in queries:
            found = SERIES_RE.findall(expr)
            assert found, f"{name} / {title}: no dopd series in {expr!r}"
            assert unknown_series(expr) == [], f"{name} / {title}: {expr!r}"
            checked += 1
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                assert unknown_series(var["query"]) == [], f"{name} variable {var['name']}"
    assert checked >= 30


def test_every_exported_metric_has_a_panel():
    used = {
        known_series()[s]
        for dash in dashboards().values()
        for _, e in panel_queries(dash)
        for s in SERIES_RE.findall(e)
    }
    assert set(ALL_METRICS) - used == set()


def test_panels_have_ids_titles_datasources_and_a_layout():
    for name, dash in dashboards().items():
        ids = []
        for p in panels(dash):
            assert isinstance(p.get("id"), int) and p["id"] > 0, f"{name}: {p.get('title')}"
            assert p.get("title"), f"{name}: panel {p['id']} has no title"
            g = p["gridPos"]
            assert {"x", "y", "w", "h"} <= g.keys() and g["x"] + g["w"] <= 24 and g["h"] > 0
            ids.append(p["id"])
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, f"{name}: {p['title']}"
            assert p["targets"], f"{name}: {p['title']} has no query"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}" and t["refId"] and t["expr"]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert sorted(ids) == list(range(1, len(ids) + 1)), f"{name}: ids should be 1..n"
        build._check_layout(dash)  # no overlaps
        assert {p["type"] for p in panels(dash)} >= {"row", "timeseries", "stat"}
    assert {"bargauge", "heatmap"} <= {p["type"] for p in panels(dashboards()["training_overview.json"])}


def test_layout_check_rejects_overlaps_and_duplicate_ids():
    base = {"title": "t", "panels": [{"id": 1, "title": "a", "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8}}]}
    overlap = {"id": 2, "title": "b", "gridPos": {"x": 6, "y": 4, "w": 12, "h": 8}}
    with pytest.raises(ValueError, match="overlaps"):
        build._check_layout({**base, "panels": base["panels"] + [overlap]})
    dup = {"id": 1, "title": "c", "gridPos": {"x": 12, "y": 0, "w": 12, "h": 8}}
    with pytest.raises(ValueError, match="duplicate id"):
        build._check_layout({**base, "panels": base["panels"] + [dup]})


MEMBER = {"training_overview.json": "actor", "rollout_fleet.json": "actor", "serving.json": "replica"}


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_variables_exist_and_are_used(name):
    """datasource, job and the per-process label (actor / replica); every query honours $job, and every
    query on a per-process series honours that variable."""
    dash, member = dashboards()[name], MEMBER[name]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "job", member], name
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    job, var = variables["job"], variables[member]
    assert job["type"] == "query" and job["query"].startswith("label_values(dopd_") and job["query"].endswith(", job)")
    assert var["type"] == "query" and var["multi"] and var["includeAll"] and var["allValue"] == ".*"
    assert var["query"].endswith(f", {member})") and "$job" in var["query"]
    per_member = 0
    for title, expr in panel_queries(dash):
        assert 'job=~"$job"' in expr, f"{name} / {title}: {expr!r} ignores $job"
        for s in SERIES_RE.findall(expr):
            if member in ALL_METRICS[known_series()[s]].labels:
                assert f'{member}=~"${member}"' in expr, f"{name} / {title}: {s} without ${member}: {expr!r}"
                per_member += 1
    assert per_member > 0, f"{name}: no panel uses ${member}"


def test_expand_variables():
    expr = 'sum by (actor) (rate(dopd_rollout_tokens_total{job=~"$job", actor=~"${actor}"}[$__rate_interval]))'
    assert expand_variables(expr, job="dopd", actor="0|1", rate_interval="10s") == (
        'sum by (actor) (rate(dopd_rollout_tokens_total{job=~"dopd", actor=~"0|1"}[10s]))'
    )
    assert expand_variables('dopd_heldout_tau{job=~"$job"}') == 'dopd_heldout_tau{job=~"dopd"}'
    with pytest.raises(KeyError, match="shard"):
        expand_variables('dopd_queue_depth{shard="$shard"}')
    for dash in dashboards().values():
        for _, expr in panel_queries(dash):
            assert "$" not in expand_variables(expr)
