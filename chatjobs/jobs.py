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

from sqlalchemy import case, cast, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs import deliveries, longcontext
from chatjobs.errors import (
    ContextTooLong,
    IdempotencyConflict,
    JobNotCancellable,
    JobNotFound,
    UpstreamError,
)
from chatjobs.models import Job, JobStatus, UpstreamCall, uuid7
from chatjobs.routing import model_spec
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings
from chatjobs.tokens import ModelSpec, count_messages

_PENDING = (JobStatus.queued, JobStatus.retrying)
_CANCELLABLE = (JobStatus.queued, JobStatus.retrying, JobStatus.running)
_BROKEN = (JobStatus.failed, JobStatus.cancelled, JobStatus.expired)


def _request_hash(body: JobCreate) -> str:
    payload = body.model_dump(mode="json", exclude={"request"})
    payload["request"] = body.request.raw
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    """What submission produced: the job, whether it is new, and the ids to publish."""

    job: Job
    created: bool
    publish: list[uuid.UUID]


def create_job(
    *, session: Session, tenant_id: uuid.UUID, body: JobCreate, idempotency_key: str | None = None
) -> Created:
    """Count the prompt, apply the long-context strategy, and insert the job.

    With an Idempotency-Key already used for the same body, the earlier job comes back with
    created False; with a different body, IdempotencyConflict. A map-reduce job is inserted
    running, with one child job per chunk (those are what get published).
    """
    settings = get_settings()
    request_hash = _request_hash(body)
    model = body.request.model or settings.default_model
    plan = longcontext.plan(body.request.raw, model, body.long_context)
    deadline = body.deadline or (
        datetime.now().astimezone() + timedelta(seconds=settings.job_deadline_seconds)
    )
    options = body.long_context.model_dump(exclude_none=True) if body.long_context else {}
    chunked = bool(plan.map_requests)
    values: dict[str, Any] = {
        "id": uuid7(),
        "tenant_id": tenant_id,
        "status": JobStatus.running if chunked else JobStatus.queued,
        "started_at": func.now() if chunked else None,
        "model": model,
        "request": body.request.raw,
        "upstream_request": plan.upstream_request,
        "metadata_": body.metadata,
        "webhook_url": body.webhook_url,
        "long_context": {**options, **(plan.record or {})} or None,
        "progress": _progress(len(plan.map_requests), 0, None) if chunked else None,
        "prompt_token_estimate": plan.prompt_tokens,
        "token_count_method": plan.method,
        "priority": body.priority,
        "queue": settings.queue_name,
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
        if not chunked:
            return Created(inserted, True, [inserted.id])
        children = _insert_steps(session, inserted, "map", 0, plan.map_requests, model_spec(model))
        return Created(inserted, True, children)
    existing = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
    ).one()
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different body (job "
            f"{existing.id}); use a new key for a new job"
        )
    return Created(existing, False, [])


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
    stmt = select(Job).where(Job.tenant_id == tenant_id, Job.parent_id.is_(None))
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
        _cancel_steps(session, job_id, JobStatus.cancelled)
        deliveries.queue_events(session, [job_id], "job.cancelled")
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
    prompt_tokens: int | None
    parent_id: uuid.UUID | None = None


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
        .returning(
            Job.id,
            Job.attempts,
            Job.model,
            # What is sent: the truncated request or the step's, else the submitted one.
            func.coalesce(Job.upstream_request, Job.request).label("request"),
            Job.max_attempts,
            Job.prompt_token_estimate,
            Job.parent_id,
        )
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
        prompt_tokens=row.prompt_token_estimate,
        parent_id=row.parent_id,
    )


def lock_parent(*, session: Session, claim: Claim) -> None:
    """Take a step's parent row lock before touching the step.

    Steps of one job finish concurrently and each advances the parent. Locking the parent
    first, always, gives one lock order (parent, then step); taking it last deadlocked in
    practice, as two finishing steps each already held a key-share lock on the parent.
    """
    if claim.parent_id is not None:
        session.execute(select(Job.id).where(Job.id == claim.parent_id).with_for_update())


def defer_job(*, session: Session, job_id: uuid.UUID, attempt: int, delay: float) -> bool:
    """Hand a claimed job back unrun until ``delay`` from now, without using an attempt.

    For a rate limit with no capacity soon: the worker slot is freed instead of sleeping.
    """
    first = Job.attempts == 1
    row = session.execute(
        _fenced(job_id, attempt)
        .values(
            # psycopg sends the CASE's branches as text; the enum column needs the cast.
            status=cast(
                case((first, JobStatus.queued.value), else_=JobStatus.retrying.value),
                Job.status.type,
            ),
            attempts=Job.attempts - 1,
            started_at=case((first, None), else_=Job.started_at),
            next_attempt_at=func.now() + timedelta(seconds=delay),
            lease_expires_at=None,
            claimed_by=None,
            updated_at=func.now(),
        )
        .returning(Job.id)
    ).one_or_none()
    return row is not None


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


@dataclass(frozen=True)
class Written:
    """A worker's outcome was recorded; ``publish`` holds steps it made runnable."""

    publish: list[uuid.UUID]


def _finish(session: Session, job_id: uuid.UUID, attempt: int, **values: Any) -> Written | None:
    row = session.execute(
        _fenced(job_id, attempt)
        .values(completed_at=func.now(), updated_at=func.now(), lease_expires_at=None, **values)
        .returning(Job.parent_id, Job.webhook_url)
    ).one_or_none()
    if row is None:
        return None
    if row.webhook_url is not None:
        deliveries.queue_events(session, [job_id], f"job.{values['status'].value}")
    if row.parent_id is None:
        return Written([])
    return Written(advance_parent(session=session, parent_id=row.parent_id))


def finish_succeeded(
    *,
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    result: dict[str, Any],
    usage: dict[str, int] | None = None,
) -> Written | None:
    """Write the result once, adding the call's usage in the same statement; None if this
    attempt no longer holds the job (then the caller adds the usage with add_usage)."""
    return _finish(
        session,
        job_id,
        attempt,
        status=JobStatus.succeeded,
        result=result,
        error=None,
        **_usage_increments(usage),
    )


def finish_failed(
    *, session: Session, job_id: uuid.UUID, attempt: int, error: UpstreamError
) -> Written | None:
    """Mark the job failed with the upstream's error; None if this attempt lost the job."""
    return _finish(session, job_id, attempt, status=JobStatus.failed, error=error_record(error))


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
        .where(
            Job.queue == get_settings().queue_name,
            Job.status.in_(_PENDING),
            Job.next_attempt_at <= func.now(),
        )
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
    mine = Job.queue == settings.queue_name
    expired = session.execute(
        update(Job)
        .where(mine, Job.status.in_(_CANCELLABLE), Job.deadline < func.now())
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
    lost = (mine, Job.status == JobStatus.running, Job.lease_expires_at < func.now())
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
        .returning(Job.id, Job.parent_id)
    ).all()
    deliveries.queue_events(session, [row.id for row in expired], "job.expired")
    deliveries.queue_events(session, [row.id for row in failed], "job.failed")
    for parent_id in {row.parent_id for row in failed if row.parent_id is not None}:
        # A step that died for good fails its parent; nothing new becomes runnable then, but
        # should it, the dispatcher publishes it.
        made = advance_parent(session=session, parent_id=parent_id)
        if made:
            session.execute(update(Job).where(Job.id.in_(made)).values(next_attempt_at=func.now()))
    stale_before = func.now() - timedelta(seconds=settings.stale_queued_seconds)
    republished = session.execute(
        update(Job)
        .where(
            mine,
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
    add_usage: bool = True,
) -> None:
    """Log one upstream call and add its tokens to the job's usage, whatever came of it.

    Usage is added unfenced: a call that was made was paid for, even when its result is
    refused because the job was cancelled or re-run meanwhile.
    """
    usage = usage or {}
    # A Core INSERT: the ORM unit of work costs more than the statement on this hot path.
    session.execute(
        insert(UpstreamCall).values(
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
    if usage and add_usage:
        add_job_usage(session=session, job_id=job_id, usage=usage)


def _usage_increments(usage: dict[str, int] | None) -> dict[str, Any]:
    if not usage:
        return {}
    return {
        "prompt_tokens": Job.prompt_tokens + usage.get("prompt_tokens", 0),
        "completion_tokens": Job.completion_tokens + usage.get("completion_tokens", 0),
        "total_tokens": Job.total_tokens + usage.get("total_tokens", 0),
    }


def add_job_usage(*, session: Session, job_id: uuid.UUID, usage: dict[str, int]) -> None:
    """Add a call's tokens to its job, whatever state the job is in: it was billed."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(**_usage_increments(usage))
        .execution_options(synchronize_session=False)
    )


# --- chunked jobs: map and reduce steps are child jobs -----------------------------------


def _progress(map_total: int, map_done: int, reduce: dict[str, int] | None) -> dict[str, Any]:
    progress: dict[str, Any] = {"map": {"done": map_done, "total": map_total}}
    if reduce is not None:
        progress["reduce"] = reduce
    return progress


def _insert_steps(
    session: Session,
    parent: Job,
    kind: str,
    level: int,
    requests: list[dict[str, Any]],
    spec: ModelSpec,
) -> list[uuid.UUID]:
    """Insert one queued child job per request; returns their ids, in order."""
    if not requests:
        return []
    rows = [
        {
            "id": uuid7(),
            "tenant_id": parent.tenant_id,
            "status": JobStatus.queued,
            "model": parent.model,
            "request": request,
            "prompt_token_estimate": count_messages(request["messages"], spec).tokens,
            "token_count_method": spec.encoding or "estimate",
            "priority": parent.priority,
            "queue": parent.queue,
            "max_attempts": parent.max_attempts,
            "deadline": parent.deadline,
            "parent_id": parent.id,
            "step_kind": kind,
            "step_level": level,
            "step_index": i,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "attempts": 0,
        }
        for i, request in enumerate(requests)
    ]
    stmt = insert(Job).values(rows).on_conflict_do_nothing(constraint="uq_jobs_parent_id_step")
    return list(session.scalars(stmt.returning(Job.id)))


def _cancel_steps(session: Session, parent_id: uuid.UUID, status: JobStatus) -> None:
    session.execute(
        update(Job)
        .where(Job.parent_id == parent_id, Job.status.in_(_CANCELLABLE))
        .values(
            status=status,
            completed_at=func.now(),
            updated_at=func.now(),
            next_attempt_at=None,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )


def _content(result: dict[str, Any] | None) -> str:
    try:
        return str((result or {})["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return ""


def advance_parent(*, session: Session, parent_id: uuid.UUID) -> list[uuid.UUID]:
    """Move a chunked job on after one of its steps finished; returns new steps to publish.

    The parent row is locked, so steps finishing at the same moment advance it one at a time:
    all maps done -> reduce steps over groups of partial answers (recursively, a level at a
    time, until one reduce remains) -> the parent succeeds with the last reduce's answer and
    the usage of every step. A step that failed for good fails the parent and cancels the rest.
    """
    parent = session.scalars(select(Job).where(Job.id == parent_id).with_for_update()).one_or_none()
    if parent is None or parent.status != JobStatus.running:
        return []
    steps = list(
        session.execute(
            select(
                Job.step_kind,
                Job.step_level,
                Job.step_index,
                Job.status,
                Job.result,
                Job.error,
                Job.prompt_tokens,
                Job.completion_tokens,
                Job.total_tokens,
            )
            .where(Job.parent_id == parent_id)
            .order_by(Job.step_level, Job.step_index)
        )
    )
    level = max(step.step_level for step in steps)
    current = [step for step in steps if step.step_level == level]
    broken = next((s for s in current if s.status in _BROKEN), None)
    maps = [step for step in steps if step.step_kind == "map"]
    maps_done = sum(1 for step in maps if step.status == JobStatus.succeeded)
    done = sum(1 for step in current if step.status == JobStatus.succeeded)
    reduce = None if level == 0 else {"level": level, "done": done, "total": len(current)}
    values: dict[str, Any] = {
        "progress": _progress(len(maps), maps_done, reduce),
        "updated_at": func.now(),
    }
    if broken is not None:
        message = (broken.error or {}).get("message") or broken.status.value
        values.update(
            status=JobStatus.failed,
            completed_at=func.now(),
            error={
                "type": "step_failed",
                "message": f"{broken.step_kind} step {broken.step_index + 1} of level "
                f"{broken.step_level} ended {broken.status.value}: {message}",
            },
        )
        _cancel_steps(session, parent_id, JobStatus.cancelled)
    elif done == len(current) and current[0].step_kind == "reduce" and len(current) == 1:
        usage = {
            key: sum(getattr(step, key) for step in steps)
            for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        values.update(
            status=JobStatus.succeeded,
            completed_at=func.now(),
            result={**(current[0].result or {}), "usage": usage},
            **usage,
        )
    session.execute(update(Job).where(Job.id == parent_id).values(**values))
    if "status" in values:
        deliveries.queue_events(session, [parent_id], f"job.{values['status'].value}")
    if broken is not None or done < len(current) or "result" in values:
        return []
    return _next_reduce(session, parent, level, [_content(step.result) for step in current])


def _next_reduce(session: Session, parent: Job, level: int, parts: list[str]) -> list[uuid.UUID]:
    spec = model_spec(parent.model)
    options = parent.long_context or {}
    reduce_prompt = options.get("reduce_prompt")
    try:
        groups = longcontext.group_parts(parent.request, parts, spec, reduce_prompt)
    except ContextTooLong as exc:
        session.execute(
            update(Job)
            .where(Job.id == parent.id)
            .values(
                status=JobStatus.failed,
                completed_at=func.now(),
                error={"type": "context_too_long", "message": str(exc)},
            )
        )
        deliveries.queue_events(session, [parent.id], "job.failed")
        return []
    requests = [
        longcontext.reduce_request(parent.request, [parts[i] for i in group], spec, reduce_prompt)
        for group in groups
    ]
    return _insert_steps(session, parent, "reduce", level + 1, requests, spec)


def list_steps(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> list[Job]:
    """A chunked job's map and reduce steps, in order; each keeps its own result."""
    get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    return list(
        session.scalars(
            select(Job).where(Job.parent_id == job_id).order_by(Job.step_level, Job.step_index)
        )
    )


def error_record(error: UpstreamError) -> dict[str, Any]:
    """The job's error field: type, message, upstream status; never headers or keys."""
    return {
        "type": error.type,
        "message": error.message,
        "status_code": error.status_code,
        "code": error.code,
        "request_id": error.request_id,
    }
