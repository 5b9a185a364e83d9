"""What workers do to jobs: claim, renew, defer, plan, and write the outcome of a call.

Every write after the claim is fenced on ``claim_seq``, a number that only grows (each claim
adds one; a deferral does not give it back), so a stale worker, a redelivered message or a
retried commit can never write into someone else's attempt. Each claim makes at most one
upstream call, logged under the key (job, claim_seq): the log insert is ON CONFLICT DO
NOTHING, and the call's tokens are added to the job only when it inserted, in the same
transaction, so a commit retried after an ambiguous failure cannot count a call twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Integer, bindparam, case, cast, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, load_only

from chatjobs.errors import ContextTooLong, TooManyUpstreamCalls, UpstreamError
from chatjobs.jobs import steps
from chatjobs.jobs._state import PENDING, prepare, run, transition
from chatjobs.longcontext import Plan
from chatjobs.models import Job, JobStatus, Tenant, UpstreamCall
from chatjobs.settings import get_settings
from chatjobs.storable import storable
from chatjobs.upstream import clean_usage


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run one attempt of a job."""

    job_id: uuid.UUID
    claim_seq: int
    attempt: int
    model: str
    request: dict[str, Any]
    max_attempts: int
    prompt_tokens: int | None
    parent_id: uuid.UUID | None = None
    needs_plan: bool = False
    # For log lines and metrics only.
    tenant_id: uuid.UUID | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    # The job's AI Gateway cache options (chatjobs.schemas.GatewayOptions), if any.
    gateway: dict[str, Any] | None = None
    # Seconds since the job was submitted, when it was claimed (time.monotonic()).
    age_seconds: float = 0.0
    claimed_at: float = 0.0


def _lease() -> timedelta:
    return timedelta(seconds=get_settings().lease_seconds)


def _guard(job_id: Any, claim_seq: Any) -> list[Any]:
    """The guard on every write a worker makes: still running, and still its claim."""
    return [Job.id == job_id, Job.status == JobStatus.running, Job.claim_seq == claim_seq]


def _fence(claim: Claim) -> list[Any]:
    """The guard of ``claim``, for a statement built per call."""
    return _guard(claim.job_id, claim.claim_seq)


# The guard of a prepared statement: its parameters come from ``_claimed()``.
_FENCE = _guard(bindparam("job_id"), bindparam("seq"))


def _claimed(claim: Claim) -> dict[str, Any]:
    return {"job_id": claim.job_id, "seq": claim.claim_seq}


_CLAIM = prepare(
    [
        Job.id == bindparam("job_id"),
        # Not IN: an IN list is rendered again on every execution.
        or_(*(Job.status == status for status in PENDING)),
        (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= func.now()),
        (Job.deadline.is_(None)) | (Job.deadline > func.now()),
    ],
    JobStatus.running,
    attempts=Job.attempts + 1,
    claim_seq=Job.claim_seq + 1,
    started_at=func.coalesce(Job.started_at, func.now()),
    claimed_by=bindparam("worker"),
    returning=(
        Job.claim_seq,
        Job.attempts,
        Job.model,
        # What is sent: the truncated request or the step's, else the submitted one.
        func.coalesce(Job.upstream_request, Job.request).label("request"),
        Job.max_attempts,
        Job.prompt_token_estimate,
        Job.needs_plan,
        Job.gateway,
    ),
)


def claim_job(*, session: Session, job_id: uuid.UUID, worker: str) -> Claim | None:
    """Move a due job to running and take its lease; None if someone else has it, it is
    finished, not yet due, or past its deadline (the reconciler expires it)."""
    rows = run(session, _CLAIM, {"job_id": job_id, "worker": worker}, lease=_lease())
    if not rows:
        return None
    row = rows[0]
    return Claim(
        job_id=row.id,
        claim_seq=row.claim_seq,
        attempt=row.attempts,
        model=row.model,
        request=row.request,
        max_attempts=row.max_attempts,
        prompt_tokens=row.prompt_token_estimate,
        parent_id=row.parent_id,
        needs_plan=row.needs_plan,
        tenant_id=row.tenant_id,
        batch_id=row.batch_id,
        schedule_id=row.schedule_id,
        gateway=row.gateway,
        age_seconds=float(row.age_seconds),
        claimed_at=time.monotonic(),
    )


def renew_leases(
    *, session: Session, held: Collection[tuple[uuid.UUID, int]]
) -> set[tuple[uuid.UUID, int]]:
    """Extend the leases a worker still holds (pairs of job and claim_seq); returns those it
    still holds. A job missing from the answer was cancelled, expired, or claimed again after
    this worker's lease ran out: its call should be abandoned.

    Never waits on a row lock (SKIP LOCKED), so the heartbeat takes no part in any lock
    order; a row busy right now is judged by its committed state and renewed next beat.
    """
    if not held:
        return set()
    mine = [tuple_(Job.id, Job.claim_seq).in_(list(held)), Job.status == JobStatus.running]
    free = select(Job.id).where(*mine).with_for_update(skip_locked=True).scalar_subquery()
    renewed = session.execute(
        update(Job)
        .where(Job.id.in_(free))
        .values(lease_expires_at=func.now() + _lease())
        .returning(Job.id, Job.claim_seq)
        .execution_options(synchronize_session=False)
    ).all()
    kept = {(row.id, row.claim_seq) for row in renewed}
    busy = set(held) - kept
    if busy:
        still = session.execute(select(Job.id, Job.claim_seq).where(*mine)).all()
        kept |= {(row.id, row.claim_seq) for row in still} & busy
    return kept


def defer_job(*, session: Session, claim: Claim, delay: float) -> bool:
    """Hand a claimed job back unrun until ``delay`` from now, without using an attempt.

    For a rate limit with no capacity soon: the worker slot is freed instead of sleeping.
    The claim sequence keeps its step, so this claim's fence never matches again.
    """
    first = Job.attempts == 1
    rows = transition(
        session,
        _fence(claim),
        # psycopg sends the CASE's branches as text; the enum column needs the cast.
        cast(
            case((first, JobStatus.queued.value), else_=JobStatus.retrying.value),
            Job.status.type,
        ),
        due_in=delay,
        attempts=Job.attempts - 1,
        started_at=case((first, None), else_=Job.started_at),
    )
    return bool(rows)


# --- planning a long input, for jobs too large to plan in the API -------------------------


def load_for_plan(
    *, session: Session, claim: Claim
) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """The submitted request, the job's long-context options, and its tenant's limit on map
    calls (None: the default)."""
    row = session.execute(
        select(Job.request, Job.long_context, Tenant.max_calls_per_job)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.id == claim.job_id)
    ).one()
    return row.request, row.long_context or {}, row.max_calls_per_job


@dataclass(frozen=True)
class Planned:
    """What planning a claimed job came to: ``claim`` to call now, or steps made runnable."""

    claim: Claim | None
    runnable: list[uuid.UUID]
    outcome: str


def apply_plan(
    *, session: Session, claim: Claim, plan: Plan | ContextTooLong, options: dict[str, Any]
) -> Planned:
    """Store what the worker planned: the job fails (``error`` strategy, or nothing fits), runs
    as it is or truncated in this same claim, or waits, running without a lease, on steps."""
    if isinstance(plan, ContextTooLong):
        kind = (
            "too_many_upstream_calls"
            if isinstance(plan, TooManyUpstreamCalls)
            else "context_length_exceeded"
        )
        failed = transition(
            session,
            _fence(claim),
            JobStatus.failed,
            error={"type": kind, "message": str(plan)},
            needs_plan=False,
        )
        return Planned(None, [], "failed" if failed else "stale")
    values: dict[str, Any] = {
        "needs_plan": False,
        "prompt_token_estimate": plan.prompt_tokens,
        "token_count_method": plan.method,
        "long_context": {**options, **(plan.record or {})} or None,
        "updated_at": func.now(),
    }
    if plan.map_requests:
        values.update(
            lease_expires_at=None,
            claimed_by=None,
            progress=steps.progress(len(plan.map_requests), 0, None),
        )
    else:
        values["upstream_request"] = plan.upstream_request
    stored = session.execute(
        update(Job).where(*_fence(claim)).values(**values).returning(Job.id)
    ).one_or_none()
    if stored is None:
        return Planned(None, [], "stale")
    if plan.map_requests:
        parent = session.scalars(
            select(Job)
            .where(Job.id == claim.job_id)
            .options(
                load_only(
                    Job.id,
                    Job.tenant_id,
                    Job.model,
                    Job.priority,
                    Job.queue,
                    Job.max_attempts,
                    Job.deadline,
                )
            )
        ).one()
        runnable = steps.insert_steps(session, parent, "map", 0, plan.map_requests, plan.map_tokens)
        return Planned(None, runnable, "planned")
    request = plan.upstream_request or claim.request
    return Planned(
        replace(claim, request=request, prompt_tokens=plan.prompt_tokens, needs_plan=False),
        [],
        "ready",
    )


# --- the outcome of a call -----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One upstream call as logged: what came back, never the request or any key."""

    stream: bool
    latency_ms: int
    status_code: int | None
    usage: dict[str, int] | None
    request_id: str | None
    error: str | None
    # Answered from a gateway cache (the usage was returned, not billed).
    cached: bool = False
    # The usage was counted by chatjobs, not reported by the provider.
    usage_estimated: bool = False
    # Made through a provider's batch API (chatjobs.offload), billed at its discount.
    offloaded: bool = False


@dataclass(frozen=True)
class Outcome:
    """What recording an attempt came to, and any steps it made runnable."""

    status: str
    runnable: list[uuid.UUID]


# The columns come from the parameters of each execution.
_LOG_CALL = (
    insert(UpstreamCall)
    .on_conflict_do_nothing(index_elements=["job_id", "claim_seq"])
    .returning(UpstreamCall.id)
)

_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
# Each usage column plus the parameter add_<column>, the call's tokens (``_log_call()``).
_ADD_USAGE = {
    column: getattr(Job, column) + bindparam(f"add_{column}", type_=Integer()) for column in _USAGE
}


def _log_call(session: Session, claim: Claim, call: Call) -> dict[str, int] | None:
    """Insert the call's row; returns the tokens to add to the job, as the parameters of
    ``_ADD_USAGE`` (0 for what the call did not report), or None if this claim's call was
    logged already (a retried commit).

    The caller adds them in the same transaction, in the UPDATE that records the outcome
    (one new version of the job's row, not two), or on their own when that UPDATE is refused:
    a call that was made was paid for, even when its result is refused.
    """
    usage = clean_usage(call.usage) or {}
    logged = (
        session.connection()
        .execute(
            _LOG_CALL,
            {
                "job_id": claim.job_id,
                "tenant_id": claim.tenant_id,
                "claim_seq": claim.claim_seq,
                "attempt": claim.attempt,
                "model": claim.model,
                "stream": call.stream,
                "latency_ms": call.latency_ms,
                "status_code": call.status_code,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "total_tokens": usage.get("total_tokens"),
                "request_id": None if call.request_id is None else storable(call.request_id)[:200],
                "error": storable(call.error),
                "cached": call.cached,
                "usage_estimated": call.usage_estimated,
                "offloaded": call.offloaded,
            },
        )
        .one_or_none()
    )
    if logged is None:
        return None
    return {f"add_{column}": usage.get(column) or 0 for column in _USAGE}


_ADD_USAGE_ONLY = update(Job).where(Job.id == bindparam("job_id")).values(**_ADD_USAGE)


def _add_usage(session: Session, job_id: uuid.UUID, tokens: dict[str, int]) -> None:
    """Add a logged call's tokens to its job whatever its state (unfenced)."""
    if any(tokens.values()):
        session.connection().execute(_ADD_USAGE_ONLY, {"job_id": job_id, **tokens})


def error_record(error: UpstreamError) -> dict[str, Any]:
    """The job's error field: type, message, upstream status, and what the provider said
    beyond a message (Azure's content filter result); never headers or keys."""
    record: dict[str, Any] = {
        "type": error.type,
        "message": storable(error.message),
        "status_code": error.status_code,
        "code": None if error.code is None else str(error.code),
        "request_id": None if error.request_id is None else storable(error.request_id)[:200],
    }
    detail = getattr(error, "detail", None)  # an error pickled before the field existed
    if detail:
        record["detail"] = storable(detail)
    return record


_STEP = (Job.step_kind, Job.step_level, Job.step_index)
_JSON = Job.result.type
# What a call's outcome writes: fenced on the claim, with the call's tokens in the same UPDATE.
_SUCCEEDED = prepare(
    _FENCE,
    JobStatus.succeeded,
    result=bindparam("new_result", type_=_JSON),
    error=None,
    returning=(*_STEP, Job.error),
    **_ADD_USAGE,
)
_RETRYING = prepare(
    _FENCE, JobStatus.retrying, error=bindparam("new_error", type_=_JSON), **_ADD_USAGE
)
_FAILED = prepare(
    _FENCE,
    JobStatus.failed,
    error=bindparam("new_error", type_=_JSON),
    returning=(*_STEP, Job.error),
    **_ADD_USAGE,
)


def _after_end(
    session: Session, claim: Claim, rows: list[Any], status: JobStatus
) -> list[uuid.UUID]:
    """A step's end moves its parent on (the parent's lock is already held)."""
    if not rows or claim.parent_id is None:
        return []
    row = rows[0]
    end = steps.StepEnd(row.step_kind, row.step_level, row.step_index, status, row.error)
    return steps.advance(session, claim.parent_id, end)


def record_outcome(
    *,
    session: Session,
    claim: Claim,
    call: Call,
    result: dict[str, Any] | None = None,
    error: UpstreamError | None = None,
    retry_in: float | None = None,
) -> Outcome:
    """Log the call and write what came of it, fenced on the claim, in one transaction.

    ``result`` for a success; ``error`` with ``retry_in`` for a retry, without for a final
    failure; neither for a call abandoned because the job was taken away. Takes the parent's
    lock first for a step (lock order: parent, then step).
    """
    steps.lock_parent(session, claim.parent_id)
    tokens = _log_call(session, claim, call)
    if tokens is None:
        status = session.scalar(select(Job.status).where(Job.id == claim.job_id))
        return Outcome(f"recorded already ({status})", [])
    fenced = _claimed(claim)
    if result is not None:
        rows = run(session, _SUCCEEDED, {**fenced, **tokens, "new_result": storable(result)})
        status = JobStatus.succeeded
    elif error is None:
        _add_usage(session, claim.job_id, tokens)
        return Outcome("abandoned", [])
    elif retry_in is not None:
        rows = run(
            session,
            _RETRYING,
            {**fenced, **tokens, "new_error": error_record(error)},
            due_in=retry_in,
        )
        if not rows:
            _add_usage(session, claim.job_id, tokens)
        return Outcome("retrying" if rows else "stale", [])
    else:
        rows = run(session, _FAILED, {**fenced, **tokens, "new_error": error_record(error)})
        status = JobStatus.failed
    if not rows:
        _add_usage(session, claim.job_id, tokens)
        return Outcome("stale", [])
    return Outcome(status.value, _after_end(session, claim, rows, status))


def fail_attempt(
    *, session: Session, claim: Claim, message: str, retry_in: float | None
) -> Outcome:
    """Record an attempt that broke inside chatjobs (not at the upstream) as a failure of
    that attempt: retried after ``retry_in`` while attempts remain, else failed."""
    steps.lock_parent(session, claim.parent_id)
    error = {"type": "internal_error", "message": message}
    if retry_in is not None and claim.attempt < claim.max_attempts:
        rows = transition(session, _fence(claim), JobStatus.retrying, due_in=retry_in, error=error)
        return Outcome("retrying" if rows else "stale", [])
    rows = transition(
        session, _fence(claim), JobStatus.failed, error=error, returning=(*_STEP, Job.error)
    )
    if not rows:
        return Outcome("stale", [])
    return Outcome("failed", _after_end(session, claim, rows, JobStatus.failed))
