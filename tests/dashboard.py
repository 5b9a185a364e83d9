"""What the Grafana dashboard (deploy/grafana/dashboards/chatjobs.json) queries.

Shared by tests/unit/test_dashboard.py, the integration test that scrapes the real /metrics,
and scripts/prometheus-check.py. The extractor is a small lexer, not a PromQL parser: the
unit tests also run every expression through `promtool check rules`, which is one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chatjobs.json"

# The families GET /metrics exposes (issue 14), by type: what the
# dashboard may query, and what tests/integration/test_metrics.py finds in a real scrape.
FAMILIES = {
    "chatjobs_build_info": "gauge",
    "chatjobs_jobs": "gauge",
    "chatjobs_queue_oldest_age_seconds": "gauge",
    "chatjobs_batches": "gauge",
    "chatjobs_jobs_finished": "counter",
    "chatjobs_queue_wait_seconds": "histogram",
    "chatjobs_job_duration_seconds": "histogram",
    "chatjobs_upstream_requests": "counter",
    "chatjobs_upstream_latency_seconds": "histogram",
    "chatjobs_upstream_ttft_seconds": "histogram",
    "chatjobs_tokens": "counter",
    "chatjobs_limiter_wait_seconds": "histogram",
    "chatjobs_limiter_deferrals": "counter",
    "chatjobs_retries": "counter",
    "chatjobs_recovered": "counter",
    "chatjobs_webhook_deliveries": "counter",
    "chatjobs_schedule_fires": "counter",
    "chatjobs_offload_results": "counter",
    "chatjobs_offload_upstream_batches": "gauge",
    "chatjobs_offload_enqueued_tokens": "gauge",
}

# What Grafana's own variables stand for when an expression runs outside Grafana: an interval
# of at least two scrapes at the 15 s scrape interval, and the dashboard's default range.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "6h"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard and where it sits."""

    panel_id: int
    panel: str
    ref_id: str
    expr: str


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(path: Path = DASHBOARD) -> list[Query]:
    return [
        Query(panel["id"], panel["title"], target["refId"], target["expr"])
        for panel in panels(load(path))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_queries(path: Path = DASHBOARD) -> list[str]:
    """The queries of the dashboard's query variables (label_values(...) and the like)."""
    found = []
    for variable in load(path).get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else str(query))
    return found


def to_promql(expr: str, path: Path = DASHBOARD) -> str:
    """The expression as Prometheus would get it with every variable at its default.

    Grafana's interval variables become BUILTIN_VARIABLES; the dashboard's own variables their
    "All" value (they are only used in regex matchers, `model=~"$model"`).
    """
    own = {
        v["name"]: v.get("allValue") or ".*"
        for v in load(path).get("templating", {}).get("list", [])
    }

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name in BUILTIN_VARIABLES:
            return BUILTIN_VARIABLES[name]
        if name in own:
            return str(own[name])
        raise ValueError(f"unknown variable ${name} in {expr!r}")

    return _VARIABLE.sub(value, expr)


def metric_names(expr: str) -> set[str]:
    """The sample names one PromQL expression selects (`x_bucket` stays `x_bucket`).

    Strings, label matchers, ranges and grouping clauses are cut out first, so what remains
    is functions (an identifier before `(`), keywords, numbers and metric names.
    """
    label_values = _LABEL_VALUES.match(expr)
    if label_values:
        return {label_values.group(1)}
    rest = _VARIABLE.sub(" ", _STRING.sub('""', expr))
    for pattern in (_MATCHERS, _RANGE, _GROUPING):
        rest = pattern.sub(" ", rest)
    return {
        name
        for name, call in _IDENTIFIER.findall(rest)
        if not call and name.lower() not in _KEYWORDS
    }


def dashboard_metrics(path: Path = DASHBOARD, *, prefix: str = "chatjobs_") -> set[str]:
    """Every sample name the dashboard queries that starts with `prefix`.

    The default keeps chatjobs' own names, the ones the API's /metrics must expose; the
    dashboard also reads Flower's (`flower_*`), which `prefix=""` includes.
    """
    exprs = [q.expr for q in queries(path)] + variable_queries(path)
    return {name for expr in exprs for name in metric_names(expr) if name.startswith(prefix)}
