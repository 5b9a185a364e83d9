"""One attempt of a job: claim, call the upstream, record the call, write the outcome."""

from __future__ import annotations

import logging
import random
import time
import uuid

from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.errors import UpstreamError, is_retryable
from chatjobs.queue import enqueue_jobs
from chatjobs.settings import get_settings
from chatjobs.upstream import chat_completion

log = logging.getLogger("chatjobs.worker")


def run_job(job_id: uuid.UUID) -> str:
    """Run the job if it is due and unclaimed; returns what happened, for logs and tests."""
    with session_scope() as session:
        claim = jobs.claim_job(session=session, job_id=job_id)
    if claim is None:
        log.info("job %s: nothing to claim (finished, cancelled or held by another)", job_id)
        return "skipped"
    stream = bool(claim.request.get("stream"))
    started = time.monotonic()
    try:
        completion = chat_completion(claim.request, model=claim.model)
    except UpstreamError as err:
        latency_ms = int((time.monotonic() - started) * 1000)
        return _record_failure(claim, err, stream=stream, latency_ms=latency_ms)
    _log_call(claim, completion.status_code, completion.latency_ms, completion.usage, None)
    with session_scope() as session:
        jobs.record_call(
            session=session,
            job_id=claim.job_id,
            attempt=claim.attempt,
            model=claim.model,
            stream=stream,
            latency_ms=completion.latency_ms,
            status_code=completion.status_code,
            usage=completion.usage,
            request_id=completion.request_id,
            error=None,
        )
        written = jobs.finish_succeeded(
            session=session, job_id=claim.job_id, attempt=claim.attempt, result=completion.body
        )
    return "succeeded" if written else "stale"


def _record_failure(claim: jobs.Claim, err: UpstreamError, *, stream: bool, latency_ms: int) -> str:
    _log_call(claim, err.status_code, latency_ms, None, err.message)
    retry = is_retryable(err) and claim.attempt < claim.max_attempts
    with session_scope() as session:
        jobs.record_call(
            session=session,
            job_id=claim.job_id,
            attempt=claim.attempt,
            model=claim.model,
            stream=stream,
            latency_ms=latency_ms,
            status_code=err.status_code,
            usage=None,
            request_id=err.request_id,
            error=err.message,
        )
        if retry:
            written = jobs.schedule_retry(
                session=session,
                job_id=claim.job_id,
                attempt=claim.attempt,
                delay=retry_delay(claim.attempt, err.retry_after),
                error=err,
            )
        else:
            written = jobs.finish_failed(
                session=session, job_id=claim.job_id, attempt=claim.attempt, error=err
            )
    if not written:
        return "stale"
    return "retrying" if retry else "failed"


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


def _log_call(
    claim: jobs.Claim,
    status: int | None,
    latency_ms: int,
    usage: dict[str, int] | None,
    error: str | None,
) -> None:
    log.info(
        "upstream call job=%s attempt=%d model=%s status=%s latency_ms=%d tokens=%s error=%s",
        claim.job_id,
        claim.attempt,
        claim.model,
        status,
        latency_ms,
        (usage or {}).get("total_tokens"),
        error,
    )
