"""Prometheus metrics: what every process counts, summed in Redis; what the rows say, read from
Postgres when scraped. The API's ``GET /metrics`` renders both (api/routes/metrics.py).

Counters and histograms are recorded where things happen (a job's transition, an upstream
call, a deferral, a webhook attempt, a schedule's firing) in whichever process that is: the
API, a worker, beat. Each process adds them up in memory and a thread of its own adds them to
one Redis hash every second, so recording costs a dict update and the hot path no round trip.
Why Redis rather than prometheus_client's multiprocess files or a port per worker: workers run
on other hosts and in other containers than the API, where no directory is shared and a scrape
target per worker would have to be discovered; Redis is already what every process reaches.
One scrape of the API sees the whole deployment, and the totals outlive the processes that
counted them (a restarted worker does not reset them; a flushed Redis does, which Prometheus
reads as a counter reset). A process killed outright loses at most its last second.

The gauges (jobs by state and kind, the oldest due job's age by model, batches by status) are
counted from Postgres at scrape time, one grouped query each, kept for a few seconds.

Labels are bounded: model names come from requests, so ``model`` is the name only for the
models file's entries and the default model, ``other`` for the rest; reasons and outcomes are
fixed sets; and ``tenant`` is a tenant's name only for those listed in
``CHATJOBS_METRICS_TENANTS``, ``other`` for the rest. No job id is ever a label.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from chatjobs.routing import model_entries
from chatjobs.settings import get_settings

log = logging.getLogger("chatjobs.metrics")

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
_CALL_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_WAIT_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class Family:
    """A counter or histogram: its name without ``_total``, labels, and (histogram) buckets.
    ``every`` lists the label values known in advance: they are shown as 0 until counted, so
    a rate over them starts at the first event rather than the second."""

    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    every: tuple[tuple[str, ...], ...] = ()

    @property
    def histogram(self) -> bool:
        return bool(self.buckets)


UPSTREAM_CLASSES = ("2xx", "4xx", "429", "5xx", "timeout", "connection", "abandoned")
RETRY_REASONS = ("429", "5xx", "4xx", "timeout", "connection", "malformed", "internal")
RECOVERY_REASONS = ("lost_lease", "lost_message")
DELIVERY_OUTCOMES = ("succeeded", "retry", "failed", "gone", "blocked")
FIRE_OUTCOMES = ("fired", "failed", "skipped", "buffered", "missed")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "chatjobs_jobs_finished",
            "Jobs that reached a final state.",
            ("kind", "model", "outcome", "tenant"),
        ),
        Family(
            "chatjobs_queue_wait_seconds",
            "From submission to the first attempt's upstream call.",
            ("kind", "model"),
            _SECONDS,
        ),
        Family(
            "chatjobs_job_duration_seconds",
            "From submission to the final state.",
            ("kind", "model", "outcome"),
            _SECONDS,
        ),
        Family(
            "chatjobs_upstream_requests",
            "Calls to the upstream by model and how they ended.",
            ("model", "status_class"),
        ),
        Family(
            "chatjobs_upstream_latency_seconds",
            "Upstream call time, request sent to the whole answer read.",
            ("model",),
            _CALL_SECONDS,
        ),
        Family(
            "chatjobs_upstream_ttft_seconds",
            "Streamed calls: request sent to the first event.",
            ("model",),
            _TTFT_SECONDS,
        ),
        Family(
            "chatjobs_tokens",
            "Tokens the upstream reported, by model and type.",
            ("model", "type", "tenant"),
        ),
        Family(
            "chatjobs_limiter_wait_seconds",
            "Time a claimed job waited in the shared rate limiter before its call.",
            ("model",),
            _WAIT_SECONDS,
        ),
        Family(
            "chatjobs_limiter_deferrals",
            "Claimed jobs handed back until the limiter has room, by the limit that was full.",
            ("model", "reason"),
        ),
        Family(
            "chatjobs_retries",
            "Attempts that failed transiently and were scheduled again.",
            ("reason",),
            every=tuple((r,) for r in RETRY_REASONS),
        ),
        Family(
            "chatjobs_recovered",
            "Jobs the reconciler recovered: a lease that ran out, a broker message lost.",
            ("reason",),
            every=tuple((r,) for r in RECOVERY_REASONS),
        ),
        Family(
            "chatjobs_webhook_deliveries",
            "Webhook delivery attempts by outcome.",
            ("outcome",),
            every=tuple((o,) for o in DELIVERY_OUTCOMES),
        ),
        Family(
            "chatjobs_schedule_fires",
            "Schedule firings by what came of them.",
            ("outcome",),
            every=tuple((o,) for o in FIRE_OUTCOMES),
        ),
        Family(
            "chatjobs_offload_results",
            "Items of provider batch APIs (offload) by what the upstream said of them:"
            " a result, an error, or not run (expired, cancelled).",
            ("model", "outcome"),
        ),
    )
}

JOB_STATES = ("queued", "retrying", "running", "succeeded", "failed", "cancelled", "expired")
JOB_KINDS = ("job", "batch_item", "schedule", "chunk")
OFFLOAD_STATUSES = ("building", "submitted", "ended", "failed_to_submit")
BATCH_STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)


def usage_tokens(usage: dict[str, int], raw: Any) -> dict[str, int]:
    """Prompt and completion tokens of a call's (cleaned) ``usage``, and the cached and
    reasoning tokens among them where the upstream's ``raw`` usage reports them (OpenAI's usage
    details); an odd shape counts as none."""
    raw = raw if isinstance(raw, dict) else {}
    counts = {
        "prompt": usage.get("prompt_tokens", 0),
        "completion": usage.get("completion_tokens", 0),
    }
    for kind, details, key in (
        ("cached", "prompt_tokens_details", "cached_tokens"),
        ("reasoning", "completion_tokens_details", "reasoning_tokens"),
    ):
        detail = raw.get(details)
        value = detail.get(key) if isinstance(detail, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31:
            counts[kind] = value
    return counts


def job_kind(parent_id: Any, batch_id: Any, schedule_id: Any) -> str:
    """What made a job: a step of a long input (chunk), a batch line, a schedule, a client."""
    if parent_id is not None:
        return "chunk"
    if batch_id is not None:
        return "batch_item"
    if schedule_id is not None:
        return "schedule"
    return "job"


def status_class(status_code: int | None, error_type: str | None = None) -> str:
    """An upstream call's outcome as one of UPSTREAM_CLASSES (a malformed 2xx counts 2xx)."""
    if status_code is not None:
        if status_code == 429:
            return "429"
        return f"{min(max(status_code // 100, 2), 5)}xx"
    if error_type == "upstream_timeout":
        return "timeout"
    if error_type == "upstream_connection_error":
        return "connection"
    return "abandoned"


def model(name: str | None) -> str:
    """The ``model`` label of a job's model: its name if configured, else ``other``."""
    if name is not None and name != "*" and (name in model_entries() or name == _default()):
        return name
    return "other"


def named_models() -> list[str]:
    """Every model with a label of its own."""
    return sorted({*(n for n in model_entries() if n != "*"), _default()})


def _default() -> str:
    return get_settings().default_model


# --- recording ---------------------------------------------------------------------------


class _TenantRef(str):
    """A tenant id waiting to become a label: its name if listed, else ``other``."""

    __slots__ = ()


def tenant(tenant_id: uuid.UUID | str | None) -> str:
    """The ``tenant`` label of ``tenant_id``: resolved when flushed (the hot path never looks a
    name up), and ``other`` at once when no tenant is listed."""
    if tenant_id is None or not _listed():
        return "other"
    return _TenantRef(str(tenant_id))


def _listed() -> tuple[str, ...]:
    raw = get_settings().metrics_tenants
    return tuple(name.strip() for name in raw.split(",") if name.strip())


class _Recorder:
    """This process's counts since its last flush, keyed by Redis hash field."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, tuple[str, ...], str], float] = {}
        self.pid = os.getpid()
        self.started = False

    def add(self, name: str, labels: tuple[str, ...], part: str, amount: float) -> None:
        key = (name, labels, part)
        with self.lock:
            self.pending[key] = self.pending.get(key, 0.0) + amount
            if not self.started:
                self.started = True
                threading.Thread(target=self._loop, name="chatjobs-metrics", daemon=True).start()

    def take(self) -> dict[tuple[str, tuple[str, ...], str], float]:
        with self.lock:
            taken, self.pending = self.pending, {}
        return taken

    def give_back(self, taken: dict[tuple[str, tuple[str, ...], str], float]) -> None:
        with self.lock:
            for key, amount in taken.items():
                self.pending[key] = self.pending.get(key, 0.0) + amount

    def _loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            flush()


FLUSH_SECONDS = 1.0
_recorder = _Recorder()
_recorder_lock = threading.Lock()


def _current() -> _Recorder:
    """The recorder of this process: a forked child starts its own (and its own thread)."""
    global _recorder
    if _recorder.pid != os.getpid():
        with _recorder_lock:
            if _recorder.pid != os.getpid():
                _recorder = _Recorder()
    return _recorder


def inc(name: str, *labels: str, amount: float = 1.0) -> None:
    """Add ``amount`` to the counter ``name`` (as in FAMILIES, without ``_total``)."""
    if amount:
        _current().add(name, labels, "", amount)


def observe(name: str, value: float, *labels: str) -> None:
    """Record ``value`` in the histogram ``name``."""
    family = FAMILIES[name]
    value = max(0.0, float(value))
    recorder = _current()
    index = next((i for i, le in enumerate(family.buckets) if value <= le), len(family.buckets))
    recorder.add(name, labels, f"b{index}", 1)
    recorder.add(name, labels, "sum", value)


def _key() -> str:
    return f"chatjobs:metrics:{get_settings().queue_name}"


_client: redis.Redis | None = None
_client_pid = 0


def _redis() -> redis.Redis:
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(
            get_settings().redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        _client_pid = os.getpid()
    return _client


def flush() -> None:
    """Add this process's counts to the shared totals (kept for the next flush if Redis is
    away: a bounded set of label values, so it cannot grow without end)."""
    recorder = _current()
    taken = recorder.take()
    if not taken:
        return
    try:
        names = _tenant_names(taken)
        pipe = _redis().pipeline(transaction=False)
        for (name, labels, part), amount in taken.items():
            resolved = tuple(_label(value, names) for value in labels)
            pipe.hincrbyfloat(_key(), _field(name, resolved, part), amount)
        pipe.execute()
    except Exception:
        recorder.give_back(taken)
        log.warning("metrics not flushed; kept for the next flush", exc_info=True)


atexit.register(flush)


def _field(name: str, labels: tuple[str, ...], part: str) -> str:
    return json.dumps([name, list(labels), part], separators=(",", ":"))


def _label(value: str, names: dict[str, str]) -> str:
    if isinstance(value, _TenantRef):
        return names.get(str(value), "other")
    return value


_names_cache: tuple[float, dict[str, str]] = (0.0, {})


def _tenant_names(taken: Iterable[tuple[str, tuple[str, ...], str]]) -> dict[str, str]:
    """Listed tenants' ids to names (entries of CHATJOBS_METRICS_TENANTS may be either),
    looked up at most once a minute and only when a count names a tenant."""
    global _names_cache
    if not any(isinstance(v, _TenantRef) for _, labels, _ in taken for v in labels):
        return {}
    at, names = _names_cache
    if time.monotonic() - at < 60:
        return names
    from chatjobs.db import session_scope

    listed = list(_listed())
    with session_scope() as session:
        rows = session.execute(
            text("SELECT id::text, name FROM tenants WHERE name = ANY(:n) OR id::text = ANY(:n)"),
            {"n": listed},
        ).all()
    names = {row[0]: row[1] for row in rows}
    _names_cache = (time.monotonic(), names)
    return names


def after_commit(session: Session, name: str, *labels: str, value: float | None = None) -> None:
    """Count (or, with ``value``, observe) once ``session``'s transaction commits: a rolled
    back change of state is not counted."""
    session.info.setdefault(_PENDING_KEY, []).append((name, labels, value))


_PENDING_KEY = "chatjobs.metrics"


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    for name, labels, value in session.info.pop(_PENDING_KEY, ()):
        if value is None:
            inc(name, *labels)
        else:
            observe(name, value, *labels)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)


# --- reading -------------------------------------------------------------------------------


def totals() -> dict[str, dict[tuple[str, ...], dict[str, float]]]:
    """The shared totals: family -> label values -> part ("" for a counter, ``b<i>`` for a
    bucket, ``sum``) -> value. Fields of unknown families (an older or newer version's) are
    left out."""
    raw = _redis().hgetall(_key())
    out: dict[str, dict[tuple[str, ...], dict[str, float]]] = {}
    for field, value in raw.items():
        try:
            name, labels, part = json.loads(field)
            family = FAMILIES[name]
        except (ValueError, KeyError, TypeError):
            continue
        if len(labels) != len(family.labels):
            continue
        series = out.setdefault(name, {}).setdefault(tuple(labels), {})
        series[part] = float(value)
    return out


def counter_samples(
    family: Family, series: dict[tuple[str, ...], dict[str, float]]
) -> Iterator[tuple[tuple[str, ...], float]]:
    """A counter's (label values, total), with the known label values at 0 until counted."""
    seen = dict.fromkeys(family.every, 0.0)
    for labels, parts in series.items():
        seen[labels] = parts.get("", 0.0)
    yield from sorted(seen.items())


def histogram_samples(
    family: Family, series: dict[tuple[str, ...], dict[str, float]]
) -> Iterator[tuple[tuple[str, ...], list[tuple[str, float]], float]]:
    """A histogram's (label values, cumulative buckets with +Inf, sum)."""
    for labels, parts in sorted(series.items()):
        running = 0.0
        buckets = []
        for i, le in enumerate((*family.buckets, float("inf"))):
            running += parts.get(f"b{i}", 0.0)
            buckets.append(("+Inf" if le == float("inf") else _le(le), running))
        yield labels, buckets, parts.get("sum", 0.0)


def _le(bound: float) -> str:
    return repr(float(bound))


# --- gauges from Postgres ------------------------------------------------------------------

_KIND_SQL = (
    "CASE WHEN parent_id IS NOT NULL THEN 'chunk' WHEN batch_id IS NOT NULL THEN 'batch_item' "
    "WHEN schedule_id IS NOT NULL THEN 'schedule' ELSE 'job' END"
)


@dataclass(frozen=True)
class Gauges:
    jobs: dict[tuple[str, str], int]  # (state, kind) -> count
    oldest: dict[str, float]  # model label -> seconds the oldest due job has waited
    batches: dict[str, int]  # status -> count
    # Provider batches (offload), all queues: rows by status, and the tokens the open ones
    # hold against offload_enqueued_tokens by model label.
    offload_batches: dict[str, int]
    offload_enqueued: dict[str, int]


_ACTIVE = "status IN ('queued', 'retrying', 'running')"
_FINISHED = "status IN ('succeeded', 'failed', 'cancelled', 'expired')"


def count_jobs(session: Session, *, finished: bool) -> dict[tuple[str, str], int]:
    """This queue's jobs by (state, kind): the active ones (few, read through the partial
    indexes on active jobs), or the finished ones (most of the table: a scan of it)."""
    rows = session.execute(
        text(
            f"SELECT status, {_KIND_SQL}, count(*) FROM jobs WHERE queue = :q"
            f" AND {_FINISHED if finished else _ACTIVE} GROUP BY 1, 2"
        ),
        {"q": get_settings().queue_name},
    )
    return {(str(state), str(kind)): int(count) for state, kind, count in rows}


def read_gauges(session: Session, finished: dict[tuple[str, str], int]) -> Gauges:
    """The state of the rows, with ``finished`` (count_jobs(finished=True), read less often)
    for the finished jobs: the active jobs, the age of the oldest job that is due and not
    running per model, and batches by status.

    A job waiting for admission has waited since it fell due (a retry's backoff is not
    waiting); one admitted to the broker, since its admission (which clears its due time).
    """
    queue = get_settings().queue_name
    oldest: dict[str, float] = {}
    for name, age in session.execute(
        text(
            "SELECT model, extract(epoch FROM now() - min(coalesce(next_attempt_at,"
            " updated_at))) FROM jobs WHERE queue = :q AND status IN ('queued', 'retrying')"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= now()) GROUP BY model"
        ),
        {"q": queue},
    ):
        label = model(name)
        oldest[label] = max(oldest.get(label, 0.0), float(age or 0.0))
    batches = {
        str(status): int(count)
        for status, count in session.execute(
            text("SELECT status, count(*) FROM batches WHERE queue = :q GROUP BY status"),
            {"q": queue},
        )
    }
    offload_batches: dict[str, int] = {}
    offload_enqueued: dict[str, int] = {}
    for status, name, count, tokens in session.execute(
        text(
            "SELECT status, model, count(*), sum(enqueued_tokens) FROM upstream_batches"
            " WHERE status IN ('building', 'submitted') OR ended_at > now() - interval '1 day'"
            " GROUP BY 1, 2"
        )
    ):
        offload_batches[str(status)] = offload_batches.get(str(status), 0) + int(count)
        if status in ("building", "submitted"):
            label = model(name)
            offload_enqueued[label] = offload_enqueued.get(label, 0) + int(tokens or 0)
    jobs = {**finished, **count_jobs(session, finished=False)}
    return Gauges(
        jobs=jobs,
        oldest=oldest,
        batches=batches,
        offload_batches=offload_batches,
        offload_enqueued=offload_enqueued,
    )
