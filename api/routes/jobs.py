"""/v1/jobs: submit, read, list and cancel chat-completion jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, TenantDep
from api.limits import limiter
from api.openapi import EVENT_STREAM, SUBMIT_EXAMPLE, V1_ERRORS, errors
from chatjobs import events, jobs
from chatjobs.db import session_scope
from chatjobs.errors import JobNotFound
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


def _read(tenant_id: uuid.UUID, job_id: uuid.UUID) -> JobRead:
    with session_scope() as session:
        return JobRead.from_job(jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id))


def _status(tenant_id: uuid.UUID, job_id: uuid.UUID) -> JobStatus | None:
    # One column, not the job with its result: a stream asks this every second it is idle.
    try:
        with session_scope() as session:
            return jobs.get_status(session=session, tenant_id=tenant_id, job_id=job_id)
    except JobNotFound:
        return None  # deleted (retention) while a stream watched it


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={**EVENT_STREAM, **errors(404, 429)},
)
async def job_events(job_id: uuid.UUID, caller: CallerDep, request: Request) -> Response:
    """Server-sent events: `status` (the job's read shape) at once and on every change,
    `delta` (content as it streams, for stream: true requests), then `done`. 429 while the
    tenant has its limit of streams open."""
    tenant_id = caller.tenant_id
    opened = await run_in_threadpool(_read, tenant_id, job_id)  # a 404 before the stream opens
    slot = await limiter().open_stream(caller)  # a 429 before it opens, too

    async def stream() -> AsyncIterator[bytes]:
        async with slot, events.hub().listen(events.channel(job_id)) as inbox:
            # Subscribed first, status read second: a change before this read shows in it,
            # a change after it is announced on the channel.
            job = opened
            if await run_in_threadpool(_status, tenant_id, job_id) != job.status:
                job = await run_in_threadpool(_read, tenant_id, job_id)
            yield _sse("status", job.model_dump_json())
            last = job.status
            while not last.is_terminal:
                try:
                    message = await asyncio.wait_for(inbox.get(), timeout=1.0)
                except TimeoutError:
                    message = None
                if await request.is_disconnected():
                    return
                if message is not None and message.get("kind") == "delta":
                    yield _sse("delta", json.dumps(message.get("delta")))
                    continue
                status = await run_in_threadpool(_status, tenant_id, job_id)
                if status is None:
                    return
                if status != last:
                    job = await run_in_threadpool(_read, tenant_id, job_id)
                    yield _sse("status", job.model_dump_json())
                    last = job.status
            yield _sse("done", json.dumps({"status": last.value}))

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )
