"""/v1/jobs: submit, read, list and cancel chat-completion jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from api.deps import SessionDep, TenantDep
from chatjobs import jobs
from chatjobs.models import JobStatus
from chatjobs.queue import enqueue_jobs
from chatjobs.schemas import JobCreate, JobList, JobRead

log = logging.getLogger("chatjobs.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobRead)
def create_job(
    body: JobCreate,
    session: SessionDep,
    tenant_id: TenantDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobRead:
    """Store a chat-completion request as a job and queue it (202 with the job).

    The same Idempotency-Key with the same body returns the first job (header
    `Idempotent-Replayed: true`); with a different body, 409.
    """
    job, created = jobs.create_job(
        session=session, tenant_id=tenant_id, body=body, idempotency_key=idempotency_key
    )
    session.commit()
    if created:
        try:
            enqueue_jobs([job.id])
        except Exception:
            # The row is durable; the reconciler re-publishes jobs left queued.
            log.exception("job %s stored but not published; the reconciler will", job.id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return JobRead.from_job(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    status: JobStatus | None = None,
    batch_id: str | None = None,
    schedule_id: str | None = None,
    after: Annotated[uuid.UUID | None, Query(description="last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """The tenant's jobs, newest first, with cursor pagination."""
    page, has_more = jobs.list_jobs(
        session=session,
        tenant_id=tenant_id,
        status=status,
        batch_id=batch_id,
        schedule_id=schedule_id,
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


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> JobRead:
    """One job, with its result and usage once it has them."""
    return JobRead.from_job(jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: uuid.UUID, session: SessionDep, tenant_id: TenantDep) -> JobRead:
    """Cancel a queued, retrying or running job; 409 if it has already finished."""
    job = jobs.cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
    return JobRead.from_job(job)
