"""The only writer of job state. Each transition is one conditional UPDATE ... RETURNING, so a
redelivered message or a stale worker changes nothing."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs.errors import IdempotencyConflict, JobNotCancellable, JobNotFound, UpstreamError
from chatjobs.models import Job, JobStatus, UpstreamCall, uuid7
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings

_PENDING = (JobStatus.queued, JobStatus.retrying)
_CANCELLABLE = (JobStatus.queued, JobStatus.retrying, JobStatus.running)


def _request_hash(body: JobCreate) -> str:
    payload = body.model_dump(mode="json", exclude={"request"})
    payload["request"] = body.request.raw
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    *, session: Session, tenant_id: uuid.UUID, body: JobCreate, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created).

    With an Idempotency-Key already used for the same body, the earlier job comes back with
    created False; with a different body, IdempotencyConflict.
    """
    settings = get_settings()
    request_hash = _request_hash(body)
    deadline = body.deadline or (
        datetime.now().astimezone() + timedelta(seconds=settings.job_deadline_seconds)
    )
    values: dict[str, Any] = {
        "id": uuid7(),
        "tenant_id": tenant_id,
        "status": JobStatus.queued,
        "model": body.request.model or settings.default_model,
        "request": body.request.raw,
        "metadata_": body.metadata,
        "webhook_url": body.webhook_url,
        "long_context": body.long_context.model_dump() if body.long_context else None,
        "priority": body.priority,
        "max_attempts": body.max_attempts or settings.max_attempts,
        "deadline": deadline,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "attempts": 0,
    }
    stmt = insert(Job).values(**values)
    if idempotency_key is not None:
        stmt = stmt.on_conflict_do_nothing(constraint="uq_jobs_tenant_idempotency_key")
    inserted = session.scalars(stmt.returning(Job)).one_or_none()
    if inserted is not None:
        return inserted, True
    existing = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
    ).one()
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different body (job "
            f"{existing.id}); use a new key for a new job"
        )
    return existing, False


def get_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job; JobNotFound for a missing job and for another tenant's alike."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def list_jobs(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    status: JobStatus | None = None,
    batch_id: str | None = None,
    schedule_id: str | None = None,
    after: uuid.UUID | None = None,
    limit: int = 20,
) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the last id of the previous page. Returns (jobs, has_more)."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    if schedule_id is not None:
        stmt = stmt.where(Job.schedule_id == schedule_id)
    if after is not None:
        stmt = stmt.where(Job.id < after)
    jobs = list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit + 1)))
    return jobs[:limit], len(jobs) > limit


def cancel_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """Cancel a job that has not finished. A running job's worker will find its write refused."""
    job = session.scalars(
        update(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status.in_(_CANCELLABLE))
        .values(
            status=JobStatus.cancelled,
            completed_at=func.now(),
            updated_at=func.now(),
            next_attempt_at=None,
            lease_expires_at=None,
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if job is not None:
        return job
    current = get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    raise JobNotCancellable(f"job {job_id} is already {current.status.value}")


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run one attempt of a job."""

    job_id: uuid.UUID
    attempt: int
    model: str
    request: dict[str, Any]
    max_attempts: int


def claim_job(*, session: Session, job_id: uuid.UUID, worker: str) -> Claim | None:
    """Move a due job to running and take its lease; None if someone else has it, it is
    finished, not yet due, or past its deadline (the reconciler expires it)."""
    lease = timedelta(seconds=get_settings().lease_seconds)
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(_PENDING),
            (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= func.now()),
            (Job.deadline.is_(None)) | (Job.deadline > func.now()),
        )
        .values(
            status=JobStatus.running,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, func.now()),
            lease_expires_at=func.now() + lease,
            next_attempt_at=None,
            claimed_by=worker,
            updated_at=func.now(),
        )
        .returning(Job.id, Job.attempts, Job.model, Job.request, Job.max_attempts)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        return None
    return Claim(
        job_id=row.id,
        attempt=row.attempts,
        model=row.model,
        request=row.request,
        max_attempts=row.max_attempts,
    )


def renew_leases(
    *, session: Session, held: Collection[tuple[uuid.UUID, int]]
) -> set[tuple[uuid.UUID, int]]:
    """Extend the leases a worker still holds; returns those it still holds.

    A job missing from the answer was cancelled, expired, or re-run after this worker's
    lease ran out: its call should be abandoned.
    """
    if not held:
        return set()
    lease = timedelta(seconds=get_settings().lease_seconds)
    rows = session.execute(
        update(Job)
        .where(
            tuple_(Job.id, Job.attempts).in_(list(held)),
            Job.status == JobStatus.running,
        )
        .values(lease_expires_at=func.now() + lease)
        .returning(Job.id, Job.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    return {(row.id, row.attempts) for row in rows}


def _fenced(job_id: uuid.UUID, attempt: int) -> Any:
    """The guard on every write a worker makes: still running, and still its attempt."""
    return update(Job).where(
        Job.id == job_id, Job.status == JobStatus.running, Job.attempts == attempt
    )


def _finish(job_id: uuid.UUID, attempt: int, **values: Any) -> Any:
    return (
        _fenced(job_id, attempt)
        .values(
            completed_at=func.now(),
            updated_at=func.now(),
            lease_expires_at=None,
            **values,
        )
        .returning(Job.id)
    )


def finish_succeeded(
    *, session: Session, job_id: uuid.UUID, attempt: int, result: dict[str, Any]
) -> bool:
    """Write the result once; False if this attempt no longer holds the job."""
    stmt = _finish(job_id, attempt, status=JobStatus.succeeded, result=result, error=None)
    return session.execute(stmt).one_or_none() is not None


def finish_failed(
    *, session: Session, job_id: uuid.UUID, attempt: int, error: UpstreamError
) -> bool:
    """Mark the job failed with the upstream's error."""
    stmt = _finish(job_id, attempt, status=JobStatus.failed, error=error_record(error))
    return session.execute(stmt).one_or_none() is not None


def schedule_retry(
    *, session: Session, job_id: uuid.UUID, attempt: int, delay: float, error: UpstreamError
) -> bool:
    """Park the job as retrying until ``delay`` seconds from now; the dispatcher wakes it."""
    row = session.execute(
        _fenced(job_id, attempt)
        .values(
            status=JobStatus.retrying,
            error=error_record(error),
            next_attempt_at=func.now() + timedelta(seconds=delay),
            updated_at=func.now(),
            lease_expires_at=None,
        )
        .returning(Job.id)
    ).one_or_none()
    return row is not None


def take_due(*, session: Session, limit: int = 1000) -> list[uuid.UUID]:
    """Claim the right to publish jobs whose delay is over, clearing next_attempt_at.

    SKIP LOCKED lets two dispatchers run at once without publishing a job twice.
    """
    due = (
        select(Job.id)
        .where(Job.status.in_(_PENDING), Job.next_attempt_at <= func.now())
        .order_by(Job.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return list(
        session.scalars(
            update(Job)
            .where(Job.id.in_(due))
            .values(next_attempt_at=None, updated_at=func.now())
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )


@dataclass(frozen=True)
class Reconciled:
    """What one reconciler pass changed."""

    expired: int
    requeued_lost_lease: int
    failed_lost_lease: int
    republished: int


def reconcile(*, session: Session) -> Reconciled:
    """Repair what crashes and lost messages leave behind; each step one UPDATE.

    - jobs past their deadline end expired (a running one's worker abandons its call at the
      next heartbeat);
    - running jobs whose lease ran out (the worker died) go back to retrying, or end failed
      once the crash has used their last attempt;
    - queued or retrying jobs that nobody has touched for ``stale_queued_seconds`` (their
      message was lost: Redis restarted, or the publish after commit failed) are made due,
      so the dispatcher publishes them again.
    """
    settings = get_settings()
    expired = session.execute(
        update(Job)
        .where(Job.status.in_(_CANCELLABLE), Job.deadline < func.now())
        .values(
            status=JobStatus.expired,
            completed_at=func.now(),
            updated_at=func.now(),
            next_attempt_at=None,
            lease_expires_at=None,
            error=func.jsonb_build_object(
                "type",
                "deadline_exceeded",
                "message",
                "the job did not finish before its deadline",
            ),
        )
        .returning(Job.id)
    ).all()
    lost = (Job.status == JobStatus.running, Job.lease_expires_at < func.now())
    lost_message = func.concat(
        "the worker running attempt ",
        Job.attempts,
        " stopped renewing its lease (crashed, killed or cut off)",
    )
    requeued = session.execute(
        update(Job)
        .where(*lost, Job.attempts < Job.max_attempts)
        .values(
            status=JobStatus.retrying,
            next_attempt_at=func.now(),
            lease_expires_at=None,
            updated_at=func.now(),
            error=func.jsonb_build_object("type", "worker_lost", "message", lost_message),
        )
        .returning(Job.id)
    ).all()
    failed = session.execute(
        update(Job)
        .where(*lost, Job.attempts >= Job.max_attempts)
        .values(
            status=JobStatus.failed,
            completed_at=func.now(),
            lease_expires_at=None,
            updated_at=func.now(),
            error=func.jsonb_build_object(
                "type",
                "worker_lost",
                "message",
                func.concat(lost_message, "; no attempts left"),
            ),
        )
        .returning(Job.id)
    ).all()
    stale_before = func.now() - timedelta(seconds=settings.stale_queued_seconds)
    republished = session.execute(
        update(Job)
        .where(
            Job.status.in_(_PENDING),
            Job.next_attempt_at.is_(None),
            Job.updated_at < stale_before,
        )
        .values(next_attempt_at=func.now(), updated_at=func.now())
        .returning(Job.id)
    ).all()
    return Reconciled(
        expired=len(expired),
        requeued_lost_lease=len(requeued),
        failed_lost_lease=len(failed),
        republished=len(republished),
    )


def record_call(
    *,
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    model: str,
    stream: bool,
    latency_ms: int,
    status_code: int | None,
    usage: dict[str, int] | None,
    request_id: str | None,
    error: str | None,
) -> None:
    """Log one upstream call and add its tokens to the job's usage, whatever came of it.

    Usage is added unfenced: a call that was made was paid for, even when its result is
    refused because the job was cancelled or re-run meanwhile.
    """
    usage = usage or {}
    session.add(
        UpstreamCall(
            job_id=job_id,
            attempt=attempt,
            model=model,
            stream=stream,
            latency_ms=latency_ms,
            status_code=status_code,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            request_id=request_id,
            error=error,
        )
    )
    if usage:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                prompt_tokens=Job.prompt_tokens + usage.get("prompt_tokens", 0),
                completion_tokens=Job.completion_tokens + usage.get("completion_tokens", 0),
                total_tokens=Job.total_tokens + usage.get("total_tokens", 0),
            )
            .execution_options(synchronize_session=False)
        )
    session.flush()


def error_record(error: UpstreamError) -> dict[str, Any]:
    """The job's error field: type, message, upstream status; never headers or keys."""
    return {
        "type": error.type,
        "message": error.message,
        "status_code": error.status_code,
        "code": error.code,
        "request_id": error.request_id,
    }
