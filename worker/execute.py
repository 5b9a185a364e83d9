"""One attempt of a job: claim, call the upstream, record the call, write the outcome."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from chatjobs import deliveries, events, jobs
from chatjobs.db import session_scope
from chatjobs.errors import LeaseLost, UpstreamError, is_retryable
from chatjobs.queue import enqueue_deliveries, enqueue_jobs
from chatjobs.routing import Route, model_spec, output_budget, route_for
from chatjobs.settings import get_settings
from chatjobs.tokens import count_messages
from chatjobs.upstream import Completion
from worker.runtime import Runtime, get_runtime

log = logging.getLogger("chatjobs.worker")
T = TypeVar("T")


def run_job(job_id: uuid.UUID) -> str:
    """Run the job if it is due and unclaimed; returns what happened, for logs and tests."""
    runtime = get_runtime()
    claim = _with_db_retry(
        lambda session: jobs.claim_job(session=session, job_id=job_id, worker=runtime.worker_id)
    )
    if claim is None:
        log.info("job %s: nothing to claim (finished, cancelled or held by another)", job_id)
        return "skipped"
    route = route_for(claim.model)
    limited = bool(route.limits.rpm or route.limits.tpm or route.limits.max_concurrency)
    if not limited:
        return _call(runtime, claim, route)
    settings = get_settings()
    call_id = f"{claim.job_id}:{claim.attempt}"
    ticket = _take_ticket(runtime, claim)
    if ticket is not None:
        # Capacity was reserved when this job was deferred: no second acquire.
        reserved, wait = ticket
        if wait > settings.limiter_max_wait_seconds:  # woken early: keep the slot, wait more
            return _defer(runtime, claim, True, reserved, wait, "reserved slot")
    else:
        reserved = reservation(claim)
        # Without a concurrency cap a far slot is reserved now and the job deferred to it
        # (a "ticket"), so a deep backlog is not claimed and deferred over and over; a cap
        # cannot be held across a deferral, so capped routes ask again instead.
        horizon = settings.limiter_max_wait_seconds
        if not route.limits.max_concurrency:
            horizon = max(horizon, route.limits.window_seconds * _TICKET_WINDOWS)
        decision = runtime.limiter.acquire(
            route.limit_key,
            route.limits,
            tokens=reserved,
            call_id=call_id,
            max_wait=horizon,
            lease_seconds=settings.lease_seconds,
        )
        wait = decision.wait
        if not decision.granted or wait > settings.limiter_max_wait_seconds:
            return _defer(runtime, claim, decision.granted, reserved, wait, decision.reason)
    try:
        if wait > 0:
            time.sleep(wait)
        return _call(runtime, claim, route, reserved=reserved)
    finally:
        runtime.limiter.release(route.limit_key, call_id)


# How far ahead (in limit windows) a deferred job may hold a reserved slot.
_TICKET_WINDOWS = 30


def _ticket_key(job_id: uuid.UUID) -> str:
    return f"chatjobs:ticket:{job_id}"


def _take_ticket(runtime: Runtime, claim: jobs.Claim) -> tuple[int, float] | None:
    """The reservation a deferred job holds: (tokens, seconds until its slot)."""
    raw = runtime.redis.getdel(_ticket_key(claim.job_id))
    if raw is None:
        return None
    tokens, slot = json.loads(raw)
    return int(tokens), max(0.0, float(slot) - time.time())


def _defer(
    runtime: Runtime,
    claim: jobs.Claim,
    reserved_slot: bool,
    tokens: int,
    wait: float,
    reason: str,
) -> str:
    """Hand the job back until its slot (or until capacity is worth asking for again)."""
    settings = get_settings()
    route = route_for(claim.model)
    runtime.limiter.release(route.limit_key, f"{claim.job_id}:{claim.attempt}")
    delay = wait
    if reserved_slot:
        runtime.redis.set(
            _ticket_key(claim.job_id),
            json.dumps([tokens, time.time() + wait]),
            ex=int(wait) + 3600,
        )
        # Come back a little before the slot; the remaining wait is slept in the slot.
        delay = max(0.0, wait - settings.limiter_max_wait_seconds / 2)
    deferred = _with_db_retry(
        lambda session: jobs.defer_job(
            session=session, job_id=claim.job_id, attempt=claim.attempt, delay=delay
        )
    )
    log.info("job %s: no %s capacity for %.1fs, deferred", claim.job_id, reason, wait)
    return "deferred" if deferred else "stale"


def reservation(claim: jobs.Claim) -> int:
    """Tokens a call may use: its prompt and the output it may ask for.

    The actual usage corrects the reservation once the call returns.
    """
    spec = model_spec(claim.model)
    prompt = claim.prompt_tokens
    if prompt is None:
        prompt = count_messages(claim.request.get("messages") or [], spec).tokens
    return prompt + output_budget(claim.request, spec)


def _call(runtime: Runtime, claim: jobs.Claim, route: Route, *, reserved: int | None = None) -> str:
    events.publish(claim.job_id, "status", {"status": "running", "attempt": claim.attempt})
    started = time.monotonic()
    try:
        completion = runtime.call(claim, route)
    except LeaseLost:
        return _record_outcome(claim, None, None, time.monotonic() - started)
    except UpstreamError as err:
        if reserved is not None and err.status_code == 429:
            # Every worker backs off at once, for as long as the upstream asked.
            runtime.limiter.cool_down(route.limit_key, err.retry_after or 1.0)
        return _record_outcome(claim, None, err, time.monotonic() - started)
    if reserved is not None:
        runtime.limiter.correct(
            route.limit_key,
            route.limits,
            reserved_tokens=reserved,
            actual_tokens=completion.usage["total_tokens"],
        )
        runtime.limiter.observe(route.limit_key, route.limits, completion.ratelimit)
    return _record_outcome(claim, completion, None, time.monotonic() - started)


def _record_outcome(
    claim: jobs.Claim, completion: Completion | None, err: UpstreamError | None, elapsed: float
) -> str:
    """Log the call and write what came of it, fenced on the attempt, in one transaction."""
    stream = bool(claim.request.get("stream"))
    latency_ms = completion.latency_ms if completion else int(elapsed * 1000)
    status: int | None = None
    usage: dict[str, int] | None = None
    request_id: str | None = None
    message: str | None = None
    if completion is not None:
        status, usage, request_id = completion.status_code, completion.usage, completion.request_id
    elif err is not None:
        status, request_id, message = err.status_code, err.request_id, err.message
    else:
        message = "abandoned: the job was cancelled, expired or re-run while the call ran"
    log.info(
        "upstream call job=%s attempt=%d model=%s status=%s latency_ms=%d tokens=%s error=%s",
        claim.job_id,
        claim.attempt,
        claim.model,
        status,
        latency_ms,
        (usage or {}).get("total_tokens"),
        message,
    )

    publish: list[uuid.UUID] = []

    def write(session: Session) -> str:
        publish.clear()  # a retried transaction starts over
        jobs.lock_parent(session=session, claim=claim)
        jobs.record_call(
            session=session,
            job_id=claim.job_id,
            attempt=claim.attempt,
            model=claim.model,
            stream=stream,
            latency_ms=latency_ms,
            status_code=status,
            usage=usage,
            request_id=request_id,
            error=message,
            # A success adds its usage in the finishing UPDATE: one statement fewer.
            add_usage=completion is None,
        )
        if completion is not None:
            written = jobs.finish_succeeded(
                session=session,
                job_id=claim.job_id,
                attempt=claim.attempt,
                result=completion.body,
                usage=completion.usage,
            )
            if written is None:
                jobs.add_job_usage(session=session, job_id=claim.job_id, usage=completion.usage)
            outcome = "succeeded"
        elif err is None:
            return "abandoned"
        elif is_retryable(err) and claim.attempt < claim.max_attempts:
            retried = jobs.schedule_retry(
                session=session,
                job_id=claim.job_id,
                attempt=claim.attempt,
                delay=retry_delay(claim.attempt, err.retry_after),
                error=err,
            )
            return "retrying" if retried else "stale"
        else:
            written = jobs.finish_failed(
                session=session, job_id=claim.job_id, attempt=claim.attempt, error=err
            )
            outcome = "failed"
        if written is None:
            return "stale"
        publish.extend(written.publish)
        return outcome

    outcome = _with_db_retry(write)
    events.publish(claim.job_id, "status", {"status": outcome})
    if publish:
        # The next steps of a chunked job, made runnable by this one: after commit.
        enqueue_jobs(publish)
    if outcome == "stale":
        log.warning(
            "job %s attempt %d: result refused, the job moved on without it",
            claim.job_id,
            claim.attempt,
        )
    return outcome


def _with_db_retry(work: Callable[[Session], T]) -> T:
    """Run one transaction, retrying while Postgres is unreachable, for up to one lease.

    The upstream call has been paid for: losing its outcome to a database restart would
    cost a second call. Past one lease the job is someone else's anyway.
    """
    deadline = time.monotonic() + get_settings().lease_seconds
    delay = 0.5
    while True:
        try:
            with session_scope() as session:
                return work(session)
        except DBAPIError as exc:
            if not (exc.connection_invalidated or isinstance(exc, OperationalError)):
                raise
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable, retrying the write in %.1fs", delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def retry_delay(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never sooner than the upstream's Retry-After."""
    settings = get_settings()
    backoff = random.uniform(
        0, min(settings.retry_cap_seconds, settings.retry_base_seconds * 2 ** (attempt - 1))
    )
    if retry_after is None:
        return backoff
    return max(backoff, min(retry_after, settings.retry_after_cap_seconds))


def dispatch_due() -> int:
    """Publish the jobs and webhook deliveries whose delay is over; rows first, then messages."""
    with session_scope() as session:
        due = jobs.take_due(session=session)
        due_deliveries = deliveries.take_due(session)
    if due:
        enqueue_jobs(due)
    if due_deliveries:
        enqueue_deliveries(due_deliveries)
    return len(due) + len(due_deliveries)


def reconcile() -> jobs.Reconciled:
    """One reconciler pass (see chatjobs.jobs.reconcile)."""
    with session_scope() as session:
        done = jobs.reconcile(session=session)
        deliveries.reconcile(session)
    if any(vars(done).values()):
        log.info("reconciled: %s", done)
    return done
