"""/v1/jobs: submit, read, list and cancel chat-completion jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api import streams
from api.deps import CallerDep, TenantDep
from api.openapi import EVENT_STREAM, SUBMIT_EXAMPLE, V1_ERRORS, errors
from api.routes.usage import Moment  # RFC 3339 only, as /v1/usage takes its range
from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.models import JobStatus
from chatjobs.schemas import JobCreate, JobList, JobRead, StepRead

log = logging.getLogger("chatjobs.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS)


@router.post(
    "",
    status_code=202,
    response_model=JobRead,
    responses=errors(400, 409, 413, 422, 429),
    openapi_extra=SUBMIT_EXAMPLE,
)
def create_job(
    body: JobCreate,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobRead:
    """Store a chat-completion request as a job and queue it (202 with the job).

    The same Idempotency-Key with the same body returns the first job (header
    `Idempotent-Replayed: true`); with a different body, 409.
    """
    with session_scope() as session:
        done = jobs.create_job(
            session=session,
            tenant_id=caller.tenant_id,
            body=body,
            idempotency_key=idempotency_key,
            max_calls=caller.limits.max_calls_per_job,
        )
        read = JobRead.from_job(done.job)
    if not done.created:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        jobs.poke()
    return read


@router.get("", response_model=JobList)
def list_jobs(
    tenant_id: TenantDep,
    status: JobStatus | None = None,
    batch_id: str | None = None,
    schedule_id: str | None = None,
    model: str | None = None,
    created_after: Annotated[
        Moment | None, Query(description="jobs created at or after it (RFC 3339 with a zone)")
    ] = None,
    created_before: Annotated[
        Moment | None, Query(description="jobs created before it (RFC 3339 with a zone)")
    ] = None,
    after: Annotated[uuid.UUID | None, Query(description="last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """The tenant's jobs, newest first, with cursor pagination."""
    with session_scope() as session:
        page, has_more = jobs.list_jobs(
            session=session,
            tenant_id=tenant_id,
            status=status,
            batch_id=batch_id,
            schedule_id=schedule_id,
            model=model,
            created_after=created_after,
            created_before=created_before,
            after=after,
            limit=limit,
        )
        data = [JobRead.from_job(job) for job in page]
    return JobList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{job_id}", response_model=JobRead, responses=errors(404))
def get_job(job_id: uuid.UUID, tenant_id: TenantDep) -> JobRead:
    """One job, with its result and usage once it has them."""
    with session_scope() as session:
        return JobRead.from_job(jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead, responses=errors(404, 409, 413))
def cancel_job(job_id: uuid.UUID, tenant_id: TenantDep) -> JobRead:
    """Cancel a queued, retrying or running job; 409 if it has already finished."""
    with session_scope() as session:
        return JobRead.from_job(
            jobs.cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
        )


@router.get("/{job_id}/steps", response_model=list[StepRead], responses=errors(404))
def list_steps(job_id: uuid.UUID, tenant_id: TenantDep) -> list[StepRead]:
    """The map and reduce steps of a chunked job, in order, each with its own result."""
    with session_scope() as session:
        steps = jobs.list_steps(session=session, tenant_id=tenant_id, job_id=job_id)
        return [StepRead.from_job(step) for step in steps]


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={**EVENT_STREAM, **errors(404, 429)},
)
async def job_events(job_id: uuid.UUID, caller: CallerDep, request: Request) -> Response:
    """Server-sent events: `status` (the job's read shape) at once and on every change,
    `delta` (content as it streams, for stream: true requests), then `done`. 429 while the
    tenant has its limit of streams open."""
    return await streams.job_events(job_id, caller, request)
