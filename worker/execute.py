"""One attempt of a job: claim, call the upstream, record the call, write the outcome."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.errors import LeaseLost, UpstreamError, is_retryable
from chatjobs.queue import enqueue_jobs
from chatjobs.settings import get_settings
from chatjobs.upstream import Completion
from worker.runtime import get_runtime

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
    started = time.monotonic()
    try:
        completion = runtime.call(claim)
    except LeaseLost:
        return _record_outcome(claim, None, None, time.monotonic() - started)
    except UpstreamError as err:
        return _record_outcome(claim, None, err, time.monotonic() - started)
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

    def write(session: Session) -> str:
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
        )
        if completion is not None:
            ok = jobs.finish_succeeded(
                session=session,
                job_id=claim.job_id,
                attempt=claim.attempt,
                result=completion.body,
            )
            return "succeeded" if ok else "stale"
        if err is None:
            return "abandoned"
        if is_retryable(err) and claim.attempt < claim.max_attempts:
            ok = jobs.schedule_retry(
                session=session,
                job_id=claim.job_id,
                attempt=claim.attempt,
                delay=retry_delay(claim.attempt, err.retry_after),
                error=err,
            )
            return "retrying" if ok else "stale"
        ok = jobs.finish_failed(
            session=session, job_id=claim.job_id, attempt=claim.attempt, error=err
        )
        return "failed" if ok else "stale"

    outcome = _with_db_retry(write)
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
    """Publish the jobs whose delay is over; the rows are marked first, then published."""
    with session_scope() as session:
        due = jobs.take_due(session=session)
    if due:
        enqueue_jobs(due)
    return len(due)


def reconcile() -> jobs.Reconciled:
    """One reconciler pass (see chatjobs.jobs.reconcile)."""
    with session_scope() as session:
        done = jobs.reconcile(session=session)
    if any(vars(done).values()):
        log.info("reconciled: %s", done)
    return done
