"""The Grafana dashboard and the Prometheus config of the monitoring profile: Grafana can load
them as provisioned, every query parses (promtool) and reads only metric families the API
exposes, with counters rated and histograms read through their buckets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard import (
    DASHBOARD,
    FAMILIES,
    dashboard_metrics,
    load,
    metric_names,
    panels,
    queries,
    to_promql,
)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

SUFFIXES = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
# Sample name -> family: what a query may select.
SAMPLES = {
    family + suffix: family for family, kind in FAMILIES.items() for suffix in SUFFIXES[kind]
}
GAUGES = {name for name, kind in FAMILIES.items() if kind == "gauge"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def datasource_uid() -> str:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus"
    return str(datasource["uid"])


def drawn(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(dashboard) if p["type"] != "row"]


def test_dashboard_is_a_provisionable_dashboard() -> None:
    dashboard = load()
    assert dashboard["uid"] == "chatjobs" and dashboard["title"]
    assert dashboard["schemaVersion"] >= 39
    assert "id" not in dashboard, "a provisioned dashboard gets its id from Grafana"
    assert len(drawn(dashboard)) >= 20


def test_every_panel_and_query_reads_the_provisioned_datasource_by_uid() -> None:
    expected = {"type": "prometheus", "uid": datasource_uid()}
    dashboard = load()
    for panel in drawn(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, (panel["title"], target["refId"])
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    every = list(panels(load()))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in every:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]
    for panel in drawn(load()):
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_grafana_provisioning_points_at_what_compose_mounts() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/chatjobs.yml").read_text())
    (dashboards,) = provider["providers"]
    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == dashboards["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert DASHBOARD.parent == GRAFANA / "dashboards"
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_metric_names_keeps_sample_names_and_drops_functions_labels_and_ranges() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_seconds_bucket{x="y{z} b_total",'
        ' model=~"$model"}[$__rate_interval]))) / on (job) group_left() b_total offset 5m'
        " > bool 1e3 and max_over_time(c:rule[1h:1m]) unless count without (le) (d)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:rule", "d"}
    assert metric_names("label_values(e_total, model)") == {"e_total"}
    assert metric_names("sum(rate(f_total[5m])) * 60") == {"f_total"}


def test_every_chatjobs_metric_the_dashboard_queries_is_an_exposed_family() -> None:
    used = dashboard_metrics()
    assert used <= set(SAMPLES), sorted(used - set(SAMPLES))
    # ...and every family has a panel.
    assert {SAMPLES[name] for name in used} == set(FAMILIES)
    others = dashboard_metrics(prefix="") - used
    assert others == {"flower_worker_online", "flower_events_total"}


def test_counters_are_rated_and_histograms_read_through_their_buckets() -> None:
    for query in queries():
        for name in re.findall(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", query.expr):
            assert name.endswith(("_total", "_bucket", "_sum", "_count")), (query.panel, name)
        names = metric_names(query.expr)
        if "histogram_quantile" in query.expr:
            assert all(n.endswith("_bucket") for n in names), query.panel
            assert re.search(r"\bby \(le\b", query.expr), query.panel
        # A gauge is read as it is: rate() over it would mean nothing.
        if names & GAUGES:
            assert not re.search(r"\b(?:rate|irate|increase)\(", query.expr), query.panel


def test_every_expression_has_its_variables_resolved_outside_grafana() -> None:
    for query in queries():
        assert "$" not in to_promql(query.expr), query


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    # Each expression as a recording rule: `promtool check rules` parses PromQL offline.
    rules = [
        {"record": f"dashboard:panel{q.panel_id}_{q.ref_id}", "expr": to_promql(q.expr)}
        for q in queries()
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    done = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


@needs_promtool
def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    # The secret files exist only in the container's tmpfs: point the config at stand-ins, so
    # promtool also checks that every file it names is one the check can find.
    text = PROMETHEUS_CONFIG.read_text()
    for name in set(re.findall(r"/run/chatjobs/(\w+)", text)):
        (tmp_path / name).write_text("stand-in\n")
    text = text.replace("/run/chatjobs/", f"{tmp_path}/")
    config = tmp_path / "prometheus.yml"
    config.write_text(text)

    done = check_config(config)
    if "field username_file not found" in done.stdout + done.stderr:
        # The image's Prometheus (3.x) has basic_auth.username_file; Debian 12's promtool
        # (2.42) predates it. Check the rest with a literal username instead.
        config.write_text(text.replace("username_file:", "username:"))
        done = check_config(config)

    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(text)["scrape_configs"]}
    assert jobs == {"api", "flower"}


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROMTOOL), "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
