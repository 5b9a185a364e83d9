"""A job's server-sent events, shared by ``GET /v1/jobs/{id}/events`` (a bearer key) and the
console's ``GET /ui/jobs/{id}/events`` (a session cookie): one stream, two ways in."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

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


# A comment line every this many seconds of silence, so a proxy that closes idle connections
# (often after 60 s) keeps the stream; clients ignore comments.
KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keepalive\n\n"
# How often ``still_allowed`` is asked (the console: is the session still signed in?).
RECHECK_SECONDS = 30.0


async def job_events(
    job_id: uuid.UUID,
    caller: Caller,
    request: Request,
    *,
    slim: bool = False,
    still_allowed: Callable[[], Awaitable[bool]] | None = None,
) -> Response:
    """`status` (the job's read shape; only ``{"status": ...}`` when ``slim``) at once and on
    every change, `delta` (content as it streams), then `done`; a ``: keepalive`` comment
    after KEEPALIVE_SECONDS of silence. ``still_allowed`` is asked every RECHECK_SECONDS and
    the stream ends (without `done`) once it answers False. JobNotFound (404) and
    StreamLimitExceeded (429) are raised before the stream opens; the tenant's open streams
    count against its limit either way in."""
    tenant_id = caller.tenant_id

    async def status_event(known: JobStatus | None = None) -> tuple[JobStatus, bytes]:
        if slim:
            status = known or await run_in_threadpool(_status, tenant_id, job_id)
            if status is None:
                raise JobNotFound(f"no job {job_id}")
            return status, _sse("status", json.dumps({"status": status.value}))
        job = await run_in_threadpool(_read, tenant_id, job_id)
        return job.status, _sse("status", job.model_dump_json())

    opened = await status_event()  # a 404 before the stream opens
    slot = await limiter().open_stream(caller)  # a 429 before it opens, too

    async def stream() -> AsyncIterator[bytes]:
        clock = asyncio.get_running_loop().time
        async with slot, events.hub().listen(events.channel(job_id)) as inbox:
            # Subscribed first, status read second: a change before this read shows in it,
            # a change after it is announced on the channel.
            last, event = opened
            now = await run_in_threadpool(_status, tenant_id, job_id)
            if now is not None and now != last:
                last, event = await status_event(now)
            yield event
            spoke = checked = clock()
            while not last.is_terminal:
                try:
                    message = await asyncio.wait_for(inbox.get(), timeout=1.0)
                except TimeoutError:
                    message = None
                if await request.is_disconnected():
                    return
                if still_allowed is not None and clock() - checked >= RECHECK_SECONDS:
                    if not await still_allowed():
                        return
                    checked = clock()
                if message is not None and message.get("kind") == "delta":
                    yield _sse("delta", json.dumps(message.get("delta")))
                    spoke = clock()
                    continue
                status = await run_in_threadpool(_status, tenant_id, job_id)
                if status is None:
                    return
                if status != last:
                    last, event = await status_event(status)
                    yield event
                    spoke = clock()
                elif clock() - spoke >= KEEPALIVE_SECONDS:
                    yield KEEPALIVE
                    spoke = clock()
            yield _sse("done", json.dumps({"status": last.value}))

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )
