"""What the API does to jobs: submit, read, list, cancel. Only top-level jobs are public;
a map or reduce step is a 404 here (its parent shows it read-only at /steps)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, load_only

from chatjobs import longcontext
from chatjobs.errors import IdempotencyConflict, JobNotCancellable, JobNotFound
from chatjobs.jobs import steps
from chatjobs.jobs._state import ACTIVE, transition
from chatjobs.models import Job, JobStatus, UpstreamCall, uuid7
from chatjobs.routing import model_spec, output_budget
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings


def _canonical(body: JobCreate) -> bytes:
    payload = body.model_dump(mode="json", exclude={"request"})
    payload["request"] = body.request.raw
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def estimated_cost(
    prompt_tokens: int | None, body_bytes: int, request: dict[str, Any], model: str
) -> int:
    """A job's estimated tokens, for fair share: its prompt (counted, else a quarter of its
    bytes) and the output it may ask for."""
    prompt = prompt_tokens if prompt_tokens is not None else body_bytes // 4
    return max(1, prompt + output_budget(request, model_spec(model)))


@dataclass(frozen=True)
class Created:
    """What submission produced: the job, whether it is new, and the jobs made runnable
    (the job, or a chunked job's first steps): the caller pokes the dispatcher for them."""

    job: Job
    created: bool
    runnable: list[uuid.UUID]


def _replay(session: Session, tenant_id: uuid.UUID, key: str, request_hash: str) -> Created | None:
    existing = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    ).one_or_none()
    if existing is None:
        return None
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different body (job "
            f"{existing.id}); use a new key for a new job"
        )
    return Created(existing, False, [])


_JOBS = cast(Table, Job.__table__)
# Parameters and result columns are named by column, attributes not always (``metadata_``).
_COLUMNS = {attr.key: attr.columns[0] for attr in Job.__mapper__.column_attrs}
_COLUMN_KEYS = {key: column.key for key, column in _COLUMNS.items() if key != column.key}


def _insert(now: str) -> Any:
    """The INSERT of a job, its columns taken from each execution's parameters and ``now``
    set by Postgres, returning the row as stored, by attribute."""
    return (
        insert(_JOBS)
        .values({now: func.now()})
        # Only a job with a key can conflict (NULL keys are distinct): one statement for all.
        .on_conflict_do_nothing(constraint="uq_jobs_tenant_idempotency_key")
        .returning(*(column.label(key) for key, column in _COLUMNS.items()))
    )


# Waiting for the dispatcher from now; a chunked parent runs (without a lease) while its
# steps do, and waits on them instead.
_INSERT = {False: _insert("next_attempt_at"), True: _insert("started_at")}


def create_job(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    body: JobCreate,
    idempotency_key: str | None = None,
    max_calls: int | None = None,
    schedule: tuple[str, datetime] | None = None,
) -> Created:
    """Insert the job, planned as far as is cheap here; ``schedule`` is the schedule and the
    nominal instant of the firing that submits it.

    With an Idempotency-Key already used for the same body, the earlier job comes back with
    created False before anything is counted; with a different body, IdempotencyConflict.
    A body that surely fits its model's window is not tokenised at all; one that may not and
    is small is planned now (the ``error`` strategy answers 422, ``map_reduce`` inserts the
    parent running with its map steps); a large one is planned by the worker that claims it.
    ``max_calls`` is the tenant's limit on map calls (None: the default; 0: none).
    """
    settings = get_settings()
    canonical = _canonical(body)
    request_hash = hashlib.sha256(canonical).hexdigest()
    if idempotency_key is not None:
        replay = _replay(session, tenant_id, idempotency_key, request_hash)
        if replay is not None:
            return replay
    model = body.request.model or settings.default_model
    plan = longcontext.plan_at_submit(
        body.request.raw, model, body.long_context, max_calls=max_calls
    )
    deadline = body.deadline or (
        datetime.now().astimezone() + timedelta(seconds=settings.job_deadline_seconds)
    )
    options = body.long_context.model_dump(exclude_none=True) if body.long_context else {}
    chunked = plan is not None and bool(plan.map_requests)
    values: dict[str, Any] = {
        "id": uuid7(),
        "tenant_id": tenant_id,
        # A chunked parent runs (without a lease) while its steps do.
        "status": JobStatus.running if chunked else JobStatus.queued,
        "model": model,
        "request": body.request.raw,
        "upstream_request": plan.upstream_request if plan else None,
        "metadata_": body.metadata,
        "webhook_url": body.webhook_url,
        "long_context": {**options, **((plan.record if plan else None) or {})} or None,
        "gateway": body.gateway.model_dump(exclude_none=True) or None if body.gateway else None,
        "needs_plan": plan is None,
        "progress": steps.progress(len(plan.map_requests), 0, None) if plan and chunked else None,
        "prompt_token_estimate": plan.prompt_tokens if plan else None,
        "token_count_method": plan.method if plan else None,
        "priority": body.priority,
        "cost": estimated_cost(
            plan.prompt_tokens if plan else None, len(canonical), body.request.raw, model
        ),
        "queue": settings.queue_name,
        "max_attempts": body.max_attempts or settings.max_attempts,
        "deadline": deadline,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "schedule_id": schedule[0] if schedule else None,
        "scheduled_for": schedule[1] if schedule else None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "attempts": 0,
        "claim_seq": 0,
    }
    stored = (
        session.connection()
        .execute(_INSERT[chunked], {_COLUMN_KEYS.get(k, k): v for k, v in values.items()})
        .one_or_none()
    )
    if stored is None:  # a concurrent request with the same key won the insert
        assert idempotency_key is not None
        replay = _replay(session, tenant_id, idempotency_key, request_hash)
        assert replay is not None
        return replay
    # The row as stored (JSONB's key order, the deadline in the database's time zone), as a
    # Job outside the session: the ORM's loading of a returned row costs more than the insert.
    inserted = Job(**stored._asdict())
    if not chunked:
        return Created(inserted, True, [inserted.id])
    assert plan is not None
    children = steps.insert_steps(session, inserted, "map", 0, plan.map_requests, plan.map_tokens)
    return Created(inserted, True, children)


def _top_level(tenant_id: uuid.UUID) -> list[Any]:
    return [Job.tenant_id == tenant_id, Job.parent_id.is_(None)]


def get_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job; JobNotFound for a missing job, a step, and another tenant's alike."""
    job = session.scalar(select(Job).where(Job.id == job_id, *_top_level(tenant_id)))
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def get_status(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> JobStatus:
    """Only the status of the tenant's job (cheap enough to poll every second)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id, *_top_level(tenant_id)))
    if status is None:
        raise JobNotFound(f"no job {job_id}")
    return status


def statuses(
    *, session: Session, tenant_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, JobStatus]:
    """The status of each of ``ids`` that is the tenant's job, in one query; any other id
    (missing, a step, another tenant's) is simply absent."""
    if not ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.status).where(Job.id.in_(set(ids)), *_top_level(tenant_id))
    )
    return {row.id: row.status for row in rows}


def list_jobs(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    status: JobStatus | None = None,
    batch_id: str | None = None,
    schedule_id: str | None = None,
    model: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    after: uuid.UUID | None = None,
    limit: int = 20,
) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the last id of the previous page. Returns (jobs, has_more).

    Every filter given narrows the list: ``created_after`` includes its instant,
    ``created_before`` excludes it, so consecutive days never share a job.
    """
    stmt = select(Job).where(*_top_level(tenant_id))
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    if schedule_id is not None:
        stmt = stmt.where(Job.schedule_id == schedule_id)
    if model is not None:
        stmt = stmt.where(Job.model == model)
    if created_after is not None:
        stmt = stmt.where(Job.created_at >= created_after)
    if created_before is not None:
        stmt = stmt.where(Job.created_at < created_before)
    if after is not None:
        stmt = stmt.where(Job.id < after)
    jobs = list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit + 1)))
    return jobs[:limit], len(jobs) > limit


def cancel_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """Cancel a job that has not finished, and its unfinished steps.

    A running job's worker finds its write refused, and its heartbeat abandons the call.
    """
    ended = transition(
        session,
        [Job.id == job_id, *_top_level(tenant_id), Job.status.in_(ACTIVE)],
        JobStatus.cancelled,
    )
    if not ended:
        current = get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        raise JobNotCancellable(f"job {job_id} is already {current.status.value}")
    steps.end_steps(session, [job_id], JobStatus.cancelled, "the job was cancelled")
    steps.roll_up_usage(session, [job_id])
    session.expire_all()
    return get_job(session=session, tenant_id=tenant_id, job_id=job_id)


def _checked(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, job: Job | None) -> None:
    # JobNotFound as get_job; ``job`` is the one the caller read with get_job (no second read).
    if job is None:
        get_status(session=session, tenant_id=tenant_id, job_id=job_id)
    elif job.id != job_id or job.tenant_id != tenant_id or job.parent_id is not None:
        raise JobNotFound(f"no job {job_id}")


def list_calls(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    job: Job | None = None,
    limit: int | None = None,
) -> list[UpstreamCall]:
    """Every upstream call made for the tenant's job, its steps' included, oldest first;
    JobNotFound as ``get_job``. ``job``: the job as get_job read it, not read again;
    ``limit``: only the newest that many, newest first."""
    _checked(session, tenant_id, job_id, job)
    family = select(Job.id).where(Job.parent_id == job_id, Job.tenant_id == tenant_id)
    stmt = select(UpstreamCall).where(
        (UpstreamCall.job_id == job_id) | UpstreamCall.job_id.in_(family)
    )
    if limit is None:
        return list(session.scalars(stmt.order_by(UpstreamCall.id)))
    return list(session.scalars(stmt.order_by(UpstreamCall.id.desc()).limit(limit)))


# What a listing of steps shows (no request, no result: a map step carries its chunk).
STEP_SUMMARY = (
    Job.id,
    Job.parent_id,
    Job.tenant_id,
    Job.step_kind,
    Job.step_level,
    Job.step_index,
    Job.status,
    Job.attempts,
    Job.prompt_tokens,
    Job.completion_tokens,
    Job.total_tokens,
    Job.error,
    Job.completed_at,
)


def list_steps(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    job: Job | None = None,
    limit: int | None = None,
) -> list[Job]:
    """A chunked job's map and reduce steps, in order; each keeps its own result. JobNotFound
    as ``get_job``; ``job``: the job as get_job read it, not read again.

    With ``limit``: at most that many, the latest stage's first (the last reduce level, then
    the one before, ..., then the map), and only the ``STEP_SUMMARY`` columns (any other
    attribute raises rather than loading a row at a time)."""
    _checked(session, tenant_id, job_id, job)
    if limit is None:
        return steps.list_steps(session, job_id)
    stmt = (
        select(Job)
        .where(Job.parent_id == job_id, Job.tenant_id == tenant_id)
        .options(load_only(*STEP_SUMMARY, raiseload=True))
        .order_by(Job.step_level.desc(), Job.step_index)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def count_steps_and_calls(
    *, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID
) -> tuple[int, int]:
    """How many steps and upstream calls the tenant's job has (its steps' calls included),
    in one query; (0, 0) for a job not the tenant's."""
    family = select(Job.id).where(Job.parent_id == job_id, Job.tenant_id == tenant_id)
    own = select(Job.id).where(Job.id == job_id, *_top_level(tenant_id))
    steps_n = select(func.count()).select_from(family.subquery()).scalar_subquery()
    calls_n = (
        select(func.count())
        .select_from(UpstreamCall)
        .where(UpstreamCall.job_id.in_(own) | UpstreamCall.job_id.in_(family))
        .scalar_subquery()
    )
    row = session.execute(select(steps_n, calls_n)).one()
    return int(row[0]), int(row[1])
