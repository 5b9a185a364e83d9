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
from chatjobs.offload.upstream import (
    BatchUpstream,
    EarlierSubmit,
    Item,
    NotOffloadable,
    Result,
)
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
    SELECT id, cost, model, offload_refused, coalesce(upstream_request, request) AS request
    FROM jobs
    WHERE queue = :queue AND model = :model AND status IN ('queued', 'retrying')
      AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()
      AND deadline >= now() + make_interval(secs => :min_deadline)
      AND NOT needs_plan AND offload_refused IS NOT TRUE
      -- With no room left, only the jobs not checked yet: whether the upstream can run them.
      AND (NOT :unchecked_only OR offload_refused IS NULL)
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
    the upstream's file limits and the route's enqueued-token budget; None if none.

    Every job looked at is checked once whether the upstream can run it (``encode``); one it
    cannot is marked ``offload_refused`` and left to the dispatcher, even while the budget
    holds the others back."""
    upstream = batch_upstream(route.offload or "")
    refused: list[uuid.UUID] = []
    try:
        with session_scope() as session:
            return _gather(session, route, upstream, refused)
    finally:
        if refused:
            jobs.poke()


def _gather(
    session: Any, route: Route, upstream: BatchUpstream, refused: list[uuid.UUID]
) -> Gathered | None:
    budget = None
    if route.offload_enqueued_tokens is not None:
        # One gather per route at a time, so two beats cannot both spend the budget.
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"offload:{route.limit_key}"},
        )
        budget = route.offload_enqueued_tokens - _held_tokens(session, route)
    full = budget is not None and budget <= 0
    rows = session.execute(
        _ELIGIBLE,
        {
            "queue": get_settings().queue_name,
            "model": route.model,
            "min_deadline": float(route.offload_min_deadline),
            "limit": upstream.max_items,
            "unchecked_only": full,
        },
    ).all()
    chosen: list[uuid.UUID] = []
    checked: list[uuid.UUID] = []
    size = tokens = 0
    for row in rows:
        if full and row.offload_refused is not None:
            continue  # checked on an earlier pass, and there is no room for it now
        try:
            line = len(upstream.encode(_item(route, row.id, row.request)))
        except NotOffloadable as exc:
            # Never offloaded from now on: the dispatcher runs it synchronously.
            log.info("offload: job %s runs synchronously: %s", row.id, exc)
            refused.append(row.id)
            continue
        except Exception:
            # A shape the translation did not foresee: this job runs synchronously, where
            # the request is checked as any other; the route's other jobs go on.
            log.exception("offload: job %s could not be encoded; it runs synchronously", row.id)
            refused.append(row.id)
            continue
        # Oldest first: once one does not fit, no younger one goes ahead of it.
        full = full or size + line > upstream.max_bytes
        full = full or (budget is not None and tokens + row.cost > budget)
        if full:
            if row.offload_refused is None:
                checked.append(row.id)
            continue
        chosen.append(row.id)
        size += line
        tokens += row.cost
    if refused:
        session.execute(update(Job).where(Job.id.in_(refused)).values(offload_refused=True))
    if checked:
        session.execute(update(Job).where(Job.id.in_(checked)).values(offload_refused=False))
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
        provider, model = row.provider, row.model
        earlier = None
        if row.submit_started_at is not None:
            # A create may have gone out and its answer been lost: look for it first.
            gathered = session.scalars(select(Job.id).where(Job.upstream_batch_id == row_id))
            taken = session.scalars(
                select(UpstreamBatch.upstream_batch_id).where(
                    UpstreamBatch.provider == provider,
                    UpstreamBatch.upstream_batch_id.is_not(None),
                    UpstreamBatch.created_at > row.submit_started_at - timedelta(days=2),
                )
            )
            earlier = EarlierSubmit(
                ref=str(row_id),
                since=row.submit_started_at,
                items=row.submit_items or 0,
                job_ids=frozenset(str(job_id) for job_id in gathered),
                taken=frozenset(str(batch_id) for batch_id in taken),
            )
    # The provider the row was gathered for, even if the models file has changed since.
    upstream = batch_upstream(provider)
    route = route_for(model).batch_route()
    own = client is None
    client = client or _client()
    try:
        found = None if earlier is None else upstream.find(client, route, earlier)
        file_id = None
        if found is None:
            encoded = _encode_or_hand_back(row_id, route, upstream)
            if not encoded:
                _end(row_id, "ended", "every item left before submission")
                return None
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


def _encode_or_hand_back(row_id: uuid.UUID, route: Route, upstream: BatchUpstream) -> list[bytes]:
    """The row's requests still claimed, encoded; a job that no longer encodes (a new
    version's translation) is handed back, marked to run synchronously. Commits when and
    how many requests the create about to go out sends, before it goes out."""
    encoded: list[bytes] = []
    with session_scope() as session:
        requests = session.execute(
            select(Job.id, func.coalesce(Job.upstream_request, Job.request).label("request"))
            .where(Job.upstream_batch_id == row_id, Job.claimed_by == offloaded.owner(row_id))
            .order_by(Job.id)
        ).all()
        refused: list[uuid.UUID] = []
        for r in requests:
            try:
                encoded.append(upstream.encode(_item(route, r.id, r.request)))
            except Exception as exc:
                log.warning("offload: job %s no longer encodes (%s); runs here", r.id, exc)
                refused.append(r.id)
        if refused:
            claims = offloaded.offloaded_claims(session, row_id)
            for job_id in refused:
                if str(job_id) in claims:
                    offloaded.hand_back(session, claims[str(job_id)])
            session.execute(update(Job).where(Job.id.in_(refused)).values(offload_refused=True))
        session.execute(
            update(UpstreamBatch)
            .where(UpstreamBatch.id == row_id)
            .values(submit_started_at=func.now(), submit_items=len(encoded))
        )
    return encoded


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
        try:
            done += _submit_or_refuse(row_id, retry_delay, client)
        except Exception:
            # Left to a later pass (its lease runs out); the other rows go on.
            log.exception("offload: submitting %s failed", row_id)
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
        route, upstream_id, cancel_requested, provider = (
            route_for(row.model).batch_route(),
            row.upstream_batch_id,
            row.cancel_requested,
            row.provider,
        )
        # Its items still waiting on it (not cancelled, not handed back).
        live = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.upstream_batch_id == row_id,
                Job.status == JobStatus.running,
                Job.claimed_by == offloaded.owner(row_id),
            )
        )
    upstream = batch_upstream(provider)
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
                # A re-run of this row's results (a crashed pass) was counted the first time.
                if not status.startswith("recorded already"):
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
    """The metrics of results applied (a job cancelled meanwhile included: its tokens were
    used): what the upstream said, and the tokens it used."""
    for claim, result in written:
        model = metrics.model(claim.model)
        if result.completion is not None:
            outcome = "succeeded"
        elif result.error is not None:
            refused = result.error.code == "batch_refused"
            outcome = "not_submitted" if refused else "errored"
        else:
            outcome = "unfinished"
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
        try:
            submitted += _gather_route(route, retry_delay)
        except Exception:
            # One route's trouble (its database work, a bug) leaves the others' alone.
            log.exception("offload: gathering for %s failed", route.model)
    return submitted + submit_pass(retry_delay)


def _gather_route(route: Route, retry_delay: RetryDelay) -> int:
    submitted = 0
    while True:
        gathered = gather(route)
        if gathered is None:
            return submitted
        if not _submit_or_refuse(gathered.row_id, retry_delay):
            return submitted
        submitted += 1
        if gathered.items < batch_upstream(route.offload or "").max_items:
            return submitted
