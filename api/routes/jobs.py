"""/v1/jobs: submit, read, list and cancel chat-completion jobs."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import TenantDep
from chatjobs import events, jobs
from chatjobs.db import session_scope
from chatjobs.models import JobStatus
from chatjobs.queue import enqueue_jobs
from chatjobs.schemas import JobCreate, JobList, JobRead, StepRead
from chatjobs.settings import get_settings

log = logging.getLogger("chatjobs.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobRead)
def create_job(
    body: JobCreate,
    tenant_id: TenantDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobRead:
    """Store a chat-completion request as a job and queue it (202 with the job).

    The same Idempotency-Key with the same body returns the first job (header
    `Idempotent-Replayed: true`); with a different body, 409.
    """
    with session_scope() as session:
        done = jobs.create_job(
            session=session, tenant_id=tenant_id, body=body, idempotency_key=idempotency_key
        )
        read = JobRead.from_job(done.job)
    if not done.created:
        response.headers["Idempotent-Replayed"] = "true"
    elif done.publish:
        try:
            enqueue_jobs(done.publish)
        except Exception:
            # The rows are durable; the reconciler re-publishes jobs left queued.
            log.exception("job %s stored but not published; the reconciler will", read.id)
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


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: uuid.UUID, tenant_id: TenantDep) -> JobRead:
    """One job, with its result and usage once it has them."""
    with session_scope() as session:
        return JobRead.from_job(jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: uuid.UUID, tenant_id: TenantDep) -> JobRead:
    """Cancel a queued, retrying or running job; 409 if it has already finished."""
    with session_scope() as session:
        read = JobRead.from_job(
            jobs.cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
        )
    events.publish(job_id, "status", {"status": read.status.value})
    return read


@router.get("/{job_id}/steps", response_model=list[StepRead])
def list_steps(job_id: uuid.UUID, tenant_id: TenantDep) -> list[StepRead]:
    """The map and reduce steps of a chunked job, in order, each with its own result."""
    with session_scope() as session:
        steps = jobs.list_steps(session=session, tenant_id=tenant_id, job_id=job_id)
        return [StepRead.from_job(step) for step in steps]


def _read(tenant_id: uuid.UUID, job_id: uuid.UUID) -> JobRead:
    with session_scope() as session:
        return JobRead.from_job(jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id))


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


@router.get("/{job_id}/events", response_class=StreamingResponse)
async def job_events(job_id: uuid.UUID, tenant_id: TenantDep, request: Request) -> Response:
    """Server-sent events: `status` (the job's read shape) at once and on every change,
    `delta` (content as it streams, for stream: true requests), then `done`."""
    await run_in_threadpool(_read, tenant_id, job_id)  # a 404 before the stream opens

    async def stream() -> AsyncIterator[bytes]:
        client = aioredis.Redis.from_url(get_settings().redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe(events.channel(job_id))
        try:
            # Subscribed first, read second: nothing can fall between the two.
            job = await run_in_threadpool(_read, tenant_id, job_id)
            yield _sse("status", job.model_dump_json())
            last = job.status
            while not job.status.is_terminal:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if await request.is_disconnected():
                    return
                if message is not None:
                    payload = json.loads(message["data"])
                    if payload.get("kind") == "delta":
                        yield _sse("delta", json.dumps(payload["delta"]))
                        continue
                job = await run_in_threadpool(_read, tenant_id, job_id)
                if job.status != last:
                    yield _sse("status", job.model_dump_json())
                    last = job.status
            yield _sse("done", json.dumps({"status": job.status.value}))
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()
            await client.aclose()

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )
