"""The offload loops (docs/design-offload.md): gather eligible jobs into an upstream batch,
submit it (finding one a crash left behind instead of creating a second), poll it with
backoff, write each item's outcome through ``record_outcome``, and cancel an upstream batch
whose items were all cancelled. Run on beat's threads (worker/clock.py).

Each ``upstream_batches`` row is worked on by whoever holds its lease (``lease_expires_at``),
taken with SKIP LOCKED, so several beats may run these loops at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import func, or_, select, text, update

from chatjobs import jobs, metrics
from chatjobs.db import session_scope
from chatjobs.errors import UpstreamError, is_retryable
from chatjobs.jobs import offloaded
from chatjobs.jobs.attempts import Call, Claim, record_outcome
from chatjobs.models import Job, JobStatus, UpstreamBatch
from chatjobs.offload import batch_upstream
from chatjobs.offload.upstream import Item, NotOffloadable, Result
from chatjobs.providers.base import clean_usage
from chatjobs.routing import Route, model_spec, offload_routes, output_budget, route_for
from chatjobs.settings import get_settings

log = logging.getLogger("chatjobs.offload")

# How long one pass may hold a row (building or polling) before another may take it.
_LEASE = timedelta(minutes=10)
# Results written per transaction.
_CHUNK = 500
# A test hook: raise after the upstream batch was created and before it is recorded.
fault_after_create: Callable[[], None] | None = None

RetryDelay = Callable[[int, float | None], float]
# What the upstream said of a whole batch, for each of its items: retried by the ordinary
# backoff while attempts remain (so a batch refused again and again ends in failed jobs, not
# in a loop), whatever is_retryable says of the status.
_WHOLE_BATCH = frozenset({"batch_failed", "batch_refused"})

_ELIGIBLE = text(
    """
    SELECT id, cost, model, coalesce(upstream_request, request) AS request FROM jobs
    WHERE queue = :queue AND model = :model AND status IN ('queued', 'retrying')
      AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()
      AND deadline >= now() + make_interval(secs => :min_deadline)
      AND NOT needs_plan AND NOT offload_refused
    ORDER BY id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


def _client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0))


def _held_tokens(session: Any, route: Route) -> int:
    held = session.scalar(
        select(func.coalesce(func.sum(UpstreamBatch.enqueued_tokens), 0)).where(
            UpstreamBatch.route == route.limit_key,
            UpstreamBatch.status.in_(("building", "submitted")),
        )
    )
    return int(held or 0)


@dataclass(frozen=True)
class Gathered:
    row_id: uuid.UUID
    items: int
    tokens: int


def gather(route: Route) -> Gathered | None:
    """Claim the route's eligible jobs (oldest first) into a new ``building`` row, within
    the upstream's file limits and the route's enqueued-token budget; None if none."""
    upstream = batch_upstream(route.offload or "")
    with session_scope() as session:
        budget = None
        if route.offload_enqueued_tokens is not None:
            # One gather per route at a time, so two beats cannot both spend the budget.
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                {"key": f"offload:{route.limit_key}"},
            )
            budget = route.offload_enqueued_tokens - _held_tokens(session, route)
            if budget <= 0:
                return None
        rows = session.execute(
            _ELIGIBLE,
            {
                "queue": get_settings().queue_name,
                "model": route.model,
                "min_deadline": float(route.offload_min_deadline),
                "limit": upstream.max_items,
            },
        ).all()
        chosen: list[uuid.UUID] = []
        refused: list[uuid.UUID] = []
        size = tokens = 0
        for row in rows:
            try:
                line = len(upstream.encode(_item(route, row.id, row.request)))
            except NotOffloadable as exc:
                # Never offloaded from now on: the dispatcher runs it synchronously.
                log.info("offload: job %s runs synchronously: %s", row.id, exc)
                refused.append(row.id)
                continue
            if size + line > upstream.max_bytes:
                break
            if budget is not None and tokens + row.cost > budget:
                break
            chosen.append(row.id)
            size += line
            tokens += row.cost
        if refused:
            session.execute(update(Job).where(Job.id.in_(refused)).values(offload_refused=True))
            jobs.poke()
        if not chosen:
            return None
        row_id = uuid.uuid4()
        session.add(
            UpstreamBatch(
                id=row_id,
                route=route.limit_key,
                model=route.model,
                provider=upstream.name,
                status="building",
                items=len(chosen),
                enqueued_tokens=tokens,
                lease_expires_at=func.now() + _LEASE,
            )
        )
        session.flush()
        claimed = offloaded.claim_offloaded(session, chosen, row_id)
        log.info("offload: %d jobs gathered for %s", len(claimed), route.model)
        return Gathered(row_id, len(claimed), tokens)


def _item(route: Route, job_id: uuid.UUID, request: dict[str, Any]) -> Item:
    return Item(
        str(job_id),
        {**request, "model": route.upstream_model or route.model},
        max_output_tokens=output_budget(request, model_spec(route.model)),
    )


def submit(row_id: uuid.UUID, client: httpx.Client | None = None) -> str | None:
    """Send a ``building`` row's jobs upstream (or find the batch an earlier pass created)
    and record the upstream ids; returns the upstream batch id."""
    with session_scope() as session:
        row = session.get(UpstreamBatch, row_id)
        if row is None or row.status != "building":
            return None
        route = route_for(row.model).batch_route()
        # Set before the first create goes out: a row that has it may have an upstream batch.
        tried_since = row.submit_started_at
        if tried_since is None:
            row.submit_started_at = session.scalar(select(func.now()))
        requests = session.execute(
            select(Job.id, func.coalesce(Job.upstream_request, Job.request).label("request"))
            .where(Job.upstream_batch_id == row_id, Job.claimed_by == offloaded.owner(row_id))
            .order_by(Job.id)
        ).all()
        # Every job gathered into the row, as an earlier submit may have sent them.
        gathered = [
            str(job_id)
            for job_id in session.scalars(
                select(Job.id).where(Job.upstream_batch_id == row_id).order_by(Job.id)
            )
        ]
    upstream = batch_upstream(route.offload or row.provider)
    own = client is None
    client = client or _client()
    try:
        found = None
        if tried_since is not None:
            found = upstream.find(
                client, route, ref=str(row_id), since=tried_since, job_ids=gathered
            )
        file_id = None
        if found is None:
            if not requests:
                _end(row_id, "ended", "every item left before submission")
                return None
            encoded = [upstream.encode(_item(route, r.id, r.request)) for r in requests]
            submitted = upstream.submit(client, route, encoded, ref=str(row_id))
            found, file_id = submitted.upstream_batch_id, submitted.upstream_file_id
            if fault_after_create is not None:
                fault_after_create()
        else:
            log.info("offload: found upstream batch %s for %s again", found, row_id)
    finally:
        if own:
            client.close()
    with session_scope() as session:
        session.execute(
            update(UpstreamBatch)
            .where(UpstreamBatch.id == row_id, UpstreamBatch.status == "building")
            .values(
                status="submitted",
                upstream_batch_id=found,
                upstream_file_id=func.coalesce(file_id, UpstreamBatch.upstream_file_id),
                next_poll_at=func.now() + timedelta(seconds=get_settings().offload_poll_seconds),
                lease_expires_at=None,
                updated_at=func.now(),
            )
        )
    return found


def _end(row_id: uuid.UUID, status: str, error: str | None = None) -> None:
    with session_scope() as session:
        session.execute(
            update(UpstreamBatch)
            .where(UpstreamBatch.id == row_id)
            .values(
                status=status,
                error=error,
                lease_expires_at=None,
                next_poll_at=None,
                ended_at=func.now(),
                updated_at=func.now(),
            )
        )


def _take(where: list[Any]) -> list[uuid.UUID]:
    """Lease the rows matching ``where`` that no one holds (SKIP LOCKED)."""
    with session_scope() as session:
        free = (
            select(UpstreamBatch.id)
            .where(
                *where,
                or_(
                    UpstreamBatch.lease_expires_at.is_(None),
                    UpstreamBatch.lease_expires_at < func.now(),
                ),
            )
            .limit(20)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        return list(
            session.scalars(
                update(UpstreamBatch)
                .where(UpstreamBatch.id.in_(free))
                .values(lease_expires_at=func.now() + _LEASE)
                .returning(UpstreamBatch.id)
            )
        )


def submit_pass(retry_delay: RetryDelay, client: httpx.Client | None = None) -> int:
    """Submit every ``building`` row no one holds (a crashed pass's included)."""
    done = 0
    for row_id in _take([UpstreamBatch.status == "building"]):
        if _submit_or_refuse(row_id, retry_delay, client):
            done += 1
    return done


def _submit_or_refuse(
    row_id: uuid.UUID, retry_delay: RetryDelay, client: httpx.Client | None = None
) -> bool:
    """Submit a row; an upstream that refuses it for good (4xx but 408/409/429) fails the
    row and hands its items the error, as attempts; one unreachable leaves the row for a
    later pass, when its lease runs out (finding the batch first, should it exist)."""
    try:
        return submit(row_id, client) is not None
    except UpstreamError as exc:
        log.warning("offload: submitting %s failed: %s", row_id, exc.message)
        if is_retryable(exc) or exc.status_code is None:
            return False
        refused = UpstreamError(
            f"upstream batch refused: {exc.message}"[:2000],
            status_code=exc.status_code,
            code="batch_refused",
            request_id=exc.request_id,
        )
    apply(row_id, iter(()), retry_delay, missing=refused)
    _end(row_id, "failed_to_submit", refused.message)
    return False


def poll_pass(retry_delay: RetryDelay, client: httpx.Client | None = None) -> int:
    """Poll every submitted row that is due; apply the results of those that ended."""
    ended = 0
    own = client is None
    client = client or _client()
    try:
        for row_id in _take(
            [UpstreamBatch.status == "submitted", UpstreamBatch.next_poll_at <= func.now()]
        ):
            try:
                ended += poll(row_id, client, retry_delay)
            except UpstreamError as exc:
                log.warning("offload: polling %s failed: %s", row_id, exc.message)
                _next_poll(row_id)
    finally:
        if own:
            client.close()
    return ended


def _next_poll(row_id: uuid.UUID) -> None:
    settings = get_settings()
    with session_scope() as session:
        attempts = session.scalar(
            update(UpstreamBatch)
            .where(UpstreamBatch.id == row_id)
            .values(poll_attempts=UpstreamBatch.poll_attempts + 1, updated_at=func.now())
            .returning(UpstreamBatch.poll_attempts)
        )
        wait = min(
            settings.offload_poll_seconds * 2 ** min(int(attempts or 0), 20),
            settings.offload_poll_max_seconds,
        )
        session.execute(
            update(UpstreamBatch)
            .where(UpstreamBatch.id == row_id)
            .values(next_poll_at=func.now() + timedelta(seconds=wait), lease_expires_at=None)
        )


def poll(row_id: uuid.UUID, client: httpx.Client, retry_delay: RetryDelay) -> int:
    """One poll of a submitted row; 1 if it ended (and its results were applied)."""
    with session_scope() as session:
        row = session.get(UpstreamBatch, row_id)
        if row is None or row.status != "submitted" or row.upstream_batch_id is None:
            return 0
        route, upstream_id, cancel_requested = (
            route_for(row.model).batch_route(),
            row.upstream_batch_id,
            row.cancel_requested,
        )
        live = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.upstream_batch_id == row_id, Job.status != JobStatus.cancelled)
        )
    upstream = batch_upstream(route.offload or "openai-batch")
    if not live and not cancel_requested:
        upstream.cancel(client, route, upstream_id)
        with session_scope() as session:
            session.execute(
                update(UpstreamBatch)
                .where(UpstreamBatch.id == row_id)
                .values(cancel_requested=True, updated_at=func.now())
            )
        log.info("offload: every item of %s cancelled; upstream %s cancelled", row_id, upstream_id)
    batch = upstream.poll(client, route, upstream_id)
    with session_scope() as session:
        session.execute(
            update(UpstreamBatch)
            .where(UpstreamBatch.id == row_id)
            .values(
                upstream_status=batch.status,
                output_file_id=batch.output_ref,
                error_file_id=batch.error_ref,
                error=batch.error,
            )
        )
    if not batch.ended:
        _next_poll(row_id)
        return 0
    missing = None
    if batch.status == "failed":
        # Refused as a whole (OpenAI: validation): no item ran.
        missing = UpstreamError(
            f"upstream batch failed: {batch.error or 'no reason given'}"[:2000],
            code="batch_failed",
        )
    apply(row_id, upstream.results(client, route, batch), retry_delay, missing=missing)
    _end(row_id, "ended")
    return 1


def apply(
    row_id: uuid.UUID,
    results: Any,
    retry_delay: RetryDelay,
    *,
    missing: UpstreamError | None = None,
) -> dict[str, int]:
    """Write each item's outcome, fenced on its offload claim; jobs the upstream left out
    are handed back at the end, or get ``missing`` as their error. Returns counts by
    outcome."""
    with session_scope() as session:
        claims = offloaded.offloaded_claims(session, row_id)
        started = session.scalar(select(UpstreamBatch.created_at).where(UpstreamBatch.id == row_id))
    latency_ms = int((time.time() - started.timestamp()) * 1000) if started else 0
    counts: dict[str, int] = {}
    pending: list[tuple[Claim, Result]] = []

    def flush() -> None:
        written: list[tuple[Claim, Result]] = []
        with session_scope() as session:
            for claim, result in pending:
                status = _apply_one(session, claim, result, latency_ms, retry_delay)
                counts[status] = counts.get(status, 0) + 1
                if status != "stale" and not status.startswith("recorded already"):
                    written.append((claim, result))
        pending.clear()
        _count(written)

    for result in results:
        claim = claims.pop(result.job_id, None)
        if claim is None:
            continue
        pending.append((claim, result))
        if len(pending) >= _CHUNK:
            flush()
    for claim in claims.values():
        left = Result(str(claim.job_id), error=missing, unfinished=missing is None)
        pending.append((claim, left))
        if len(pending) >= _CHUNK:
            flush()
    flush()
    jobs.poke()
    log.info("offload: results of %s applied: %s", row_id, counts)
    return counts


def _count(written: list[tuple[Claim, Result]]) -> None:
    """The metrics of results written: what the upstream said, and the tokens it used."""
    for claim, result in written:
        model = metrics.model(claim.model)
        outcome = "succeeded" if result.completion else "errored" if result.error else "unfinished"
        metrics.inc("chatjobs_offload_results", model, outcome)
        if result.completion is None:
            continue
        raw = result.completion.get("usage")
        tenant = metrics.tenant(claim.tenant_id)
        for kind, tokens in metrics.usage_tokens(clean_usage(raw) or {}, raw).items():
            metrics.inc("chatjobs_tokens", model, kind, tenant, amount=tokens)


def _apply_one(
    session: Any, claim: Claim, result: Result, latency_ms: int, retry_delay: RetryDelay
) -> str:
    if result.completion is not None:
        body = result.completion
        call = Call(
            stream=False,
            latency_ms=latency_ms,
            status_code=200,
            usage=body.get("usage"),
            request_id=str(body["id"])[:200] if body.get("id") else None,
            error=None,
            offloaded=True,
        )
        return record_outcome(session=session, claim=claim, call=call, result=body).status
    if result.error is not None:
        err = result.error
        retry_in = None
        retryable = is_retryable(err) or err.code in _WHOLE_BATCH
        if retryable and claim.attempt < claim.max_attempts:
            retry_in = retry_delay(claim.attempt, err.retry_after)
        call = Call(
            stream=False,
            latency_ms=latency_ms,
            status_code=err.status_code,
            usage=None,
            request_id=err.request_id,
            error=err.message,
            offloaded=True,
        )
        return record_outcome(
            session=session, claim=claim, call=call, error=err, retry_in=retry_in
        ).status
    return "handed back" if offloaded.hand_back(session, claim) else "stale"


def gather_pass(retry_delay: RetryDelay) -> int:
    """Gather and submit for every offload route; returns upstream batches submitted."""
    submitted = 0
    for route in offload_routes():
        while True:
            gathered = gather(route)
            if gathered is None:
                break
            if _submit_or_refuse(gathered.row_id, retry_delay):
                submitted += 1
            else:
                break
            if gathered.items < batch_upstream(route.offload or "").max_items:
                break
    return submitted + submit_pass(retry_delay)
