"""``GET /metrics``: the whole deployment's Prometheus metrics (chatjobs.metrics says how)."""

from __future__ import annotations

import hmac
import importlib.metadata
import threading
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from api.errors import AuthenticationFailed
from chatjobs import metrics
from chatjobs.db import session_scope
from chatjobs.routing import offload_routes
from chatjobs.settings import get_settings

router = APIRouter(tags=["operations"])

try:
    _VERSION = importlib.metadata.version("chatjobs")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    _VERSION = "unknown"

# Prometheus scrapes every 15 s or so; several scrapers (or a refreshing browser) within this
# long share one read of the rows. Finished jobs are most of the table and change by the
# counters' rates anyway: counted again once a minute (a scan of 1M rows costs ~250 ms).
GAUGE_SECONDS = 5.0
FINISHED_SECONDS = 60.0
_gauges: tuple[float, metrics.Gauges] | None = None
_finished: tuple[float, dict[tuple[str, str], int]] | None = None
_gauges_lock = threading.Lock()


def _read_gauges() -> metrics.Gauges:
    global _gauges, _finished
    with _gauges_lock:
        now = time.monotonic()
        if _gauges is None or now - _gauges[0] > GAUGE_SECONDS:
            with session_scope() as session:
                if _finished is None or now - _finished[0] > FINISHED_SECONDS:
                    _finished = (now, metrics.count_jobs(session, finished=True))
                _gauges = (now, metrics.read_gauges(session, _finished[1]))
        return _gauges[1]


class _Deployment(Collector):
    """Every family, read afresh on each collect."""

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "chatjobs_build_info", "The running chatjobs version.", labels=["version"]
        )
        build.add_metric([_VERSION], 1)
        yield build
        yield from _gauge_families(_read_gauges())
        totals = metrics.totals()
        for family in metrics.FAMILIES.values():
            series = totals.get(family.name, {})
            if family.histogram:
                hist = HistogramMetricFamily(family.name, family.help, labels=family.labels)
                for labels, buckets, total in metrics.histogram_samples(family, series):
                    hist.add_metric(list(labels), buckets, total)
                yield hist
            else:
                counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
                for labels, value in metrics.counter_samples(family, series):
                    counter.add_metric(list(labels), value)
                yield counter


def _gauge_families(gauges: metrics.Gauges) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "chatjobs_jobs", "Jobs in this queue by state and kind.", labels=["state", "kind"]
    )
    for state in metrics.JOB_STATES:
        for kind in metrics.JOB_KINDS:
            jobs.add_metric([state, kind], gauges.jobs.get((state, kind), 0))
    yield jobs
    oldest = GaugeMetricFamily(
        "chatjobs_queue_oldest_age_seconds",
        "Seconds the oldest due job not yet running has waited, by model (0: none waiting).",
        labels=["model"],
    )
    for model in sorted(set(metrics.named_models()) | set(gauges.oldest)):
        oldest.add_metric([model], gauges.oldest.get(model, 0.0))
    yield oldest
    batches = GaugeMetricFamily("chatjobs_batches", "Batches by status.", labels=["status"])
    for status in sorted(set(metrics.BATCH_STATUSES) | set(gauges.batches)):
        batches.add_metric([status], gauges.batches.get(status, 0))
    yield batches
    offload = GaugeMetricFamily(
        "chatjobs_offload_upstream_batches",
        "Provider batches (offload) open, and those ended in the last day, by status.",
        labels=["status"],
    )
    for status in sorted(set(metrics.OFFLOAD_STATUSES) | set(gauges.offload_batches)):
        offload.add_metric([status], gauges.offload_batches.get(status, 0))
    yield offload
    enqueued = GaugeMetricFamily(
        "chatjobs_offload_enqueued_tokens",
        "Tokens the open provider batches hold against offload_enqueued_tokens, by model.",
        labels=["model"],
    )
    offloading = {metrics.model(route.model) for route in offload_routes()}
    for model in sorted(offloading | set(gauges.offload_enqueued)):
        enqueued.add_metric([model], gauges.offload_enqueued.get(model, 0))
    yield enqueued


# The classic text format: every Prometheus 2.x parses it (the names need no 1.0.0 escaping).
_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_registry = CollectorRegistry(auto_describe=False)
_registry.register(_Deployment())


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request) -> Response:
    """The Prometheus text exposition; with CHATJOBS_METRICS_TOKEN set, only for a caller
    presenting it as a bearer token."""
    token = get_settings().metrics_token.get_secret_value()
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise AuthenticationFailed("GET /metrics needs 'Authorization: Bearer <metrics token>'")
    metrics.flush()  # what this process counted, so the API's own counts are current
    return Response(generate_latest(_registry), media_type=_CONTENT_TYPE)
