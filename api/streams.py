"""A job's server-sent events, shared by ``GET /v1/jobs/{id}/events`` (a bearer key) and the
console's ``GET /ui/jobs/{id}/events`` (a session cookie): one stream, two ways in."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.limits import limiter
from chatjobs import events, jobs
from chatjobs.db import session_scope
from chatjobs.errors import JobNotFound
from chatjobs.models import JobStatus
from chatjobs.schemas import JobRead
from chatjobs.tenants import Caller


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


async def job_events(job_id: uuid.UUID, caller: Caller, request: Request) -> Response:
    """`status` (the job's read shape) at once and on every change, `delta` (content as it
    streams), then `done`. JobNotFound (404) and StreamLimitExceeded (429) are raised before
    the stream opens; the tenant's open streams count against its limit either way in."""
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
