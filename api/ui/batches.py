"""The console's batches pages: the list with a progress bar per batch, one batch in full (its
counts by outcome, usage, validation errors, failed lines and files), its actions (cancel,
retry what failed), downloads of its output and error files, and its progress as JSON for the
page's script. Each handler calls the same chatjobs functions as the /v1 routes."""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from api.routes.files import content_response
from api.ui.core import PREFIX, not_found, page, see_other
from api.ui.session import FormDep, SessionDep
from chatjobs.batches import service
from chatjobs.db import session_scope
from chatjobs.errors import IdempotencyConflict, InvalidRequest, NotFound
from chatjobs.models import Batch, JobStatus
from chatjobs.schemas import JobRead

router = APIRouter(prefix=PREFIX, include_in_schema=False)
PAGE_SIZE = 50
# The failed lines a batch's page lists; the jobs list (filtered by batch) has them all.
FAILED_SHOWN = 100
_ID = re.compile(r"batch_[0-9a-f]{32}")
_UNSUCCESSFUL = (JobStatus.failed, JobStatus.expired, JobStatus.cancelled)


# --- progress: pure ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pace:
    """Lines ended per second since the batch began running, and the seconds left at that
    rate; None when not known (not running yet, nothing ended yet, or already ended)."""

    rate: float | None
    eta: float | None


def pace(
    *, ended: int, total: int, started: datetime | None, until: datetime | None, now: datetime
) -> Pace:
    """The batch's pace: ``ended`` of ``total`` lines since ``started`` (in_progress_at), up to
    ``until`` (when it ended; None while it runs, then ``now``). The ETA is the remaining lines
    at the mean rate so far, and only while it runs."""
    if started is None:
        return Pace(None, None)
    elapsed = ((until or now) - started).total_seconds()
    if ended <= 0 or elapsed <= 0:
        return Pace(None, None)
    rate = ended / elapsed
    if until is not None:
        return Pace(rate, None)
    return Pace(rate, max(total - ended, 0) / rate)


def rate_text(rate: float | None) -> str:
    """``12.5 lines/s``, ``0.02 lines/s``; ``—`` when unknown."""
    if rate is None:
        return "—"
    return f"{rate:.1f} lines/s" if rate >= 1 else f"{rate:.2g} lines/s"


def duration_text(seconds: float | None) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``, ``3 d 4 h``; ``—`` when unknown."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


@dataclass(frozen=True)
class Progress:
    """A batch's counts and pace, as its page shows them and GET .../progress answers them.

    ``failed`` is OpenAI's count (every ended line that did not succeed); by outcome it is
    ``errored`` (the request failed) + ``expired`` + ``cancelled``. ``pending`` lines have not
    ended; ``running`` of them are being called right now.
    """

    id: str
    status: str
    final: bool
    total: int
    ended: int
    succeeded: int
    failed: int
    errored: int
    expired: int
    cancelled: int
    pending: int
    running: int
    percent: str
    rate: float | None
    eta_seconds: float | None
    rate_text: str
    eta_text: str
    input_tokens: int
    output_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, batch: Batch, running: int, now: datetime) -> Progress:
        ended = batch.request_completed + batch.request_failed
        final = batch.status in service.FINAL
        speed = pace(
            ended=ended,
            total=batch.request_total,
            started=batch.in_progress_at,
            until=batch.finished_at if final else None,
            now=now,
        )
        share = ended / batch.request_total if batch.request_total else 0.0
        return cls(
            id=batch.id,
            status=batch.status,
            final=final,
            total=batch.request_total,
            ended=ended,
            succeeded=batch.request_completed,
            failed=batch.request_failed,
            errored=batch.request_failed - batch.request_expired - batch.request_cancelled,
            expired=batch.request_expired,
            cancelled=batch.request_cancelled,
            pending=max(batch.request_total - ended, 0),
            running=running,
            percent=f"{int(share * 100)} %",  # floor: 100 % only once every line has ended
            rate=speed.rate,
            eta_seconds=speed.eta,
            rate_text=rate_text(speed.rate),
            eta_text=duration_text(speed.eta),
            input_tokens=batch.input_tokens,
            output_tokens=batch.output_tokens,
            total_tokens=batch.total_tokens,
        )


# --- reads --------------------------------------------------------------------------------


def _batch_id(raw: str) -> str:
    if not _ID.fullmatch(raw):
        raise not_found()
    return raw


def _list(tenant_id: uuid.UUID, after: str | None, limit: int) -> dict[str, Any]:
    with session_scope() as session:
        rows, has_more = service.list_batches(
            session, tenant_id=tenant_id, after=after, limit=limit
        )
        running = service.running_lines(session, rows)
        session.expunge_all()
    now = datetime.now(UTC)
    return {
        "batches": [(b, Progress.of(b, running.get(b.id, 0), now)) for b in rows],
        "next_after": rows[-1].id if has_more and rows else None,
        "paged": after is not None,
        "limit_query": f"&limit={limit}" if limit != PAGE_SIZE else "",
    }


@router.get("/batches", response_class=HTMLResponse)
async def batch_list(request: Request, current: SessionDep) -> HTMLResponse:
    """The tenant's batches, newest first, a page at a time, each with its progress."""
    after = request.query_params.get("after") or None
    if after is not None and not _ID.fullmatch(after):
        after = None  # a cursor that is not a batch id: the first page
    try:
        limit = int(request.query_params.get("limit") or PAGE_SIZE)
    except ValueError:
        limit = PAGE_SIZE
    limit = min(max(limit, 1), 100)
    context = await run_in_threadpool(_list, current.caller.tenant_id, after, limit)
    return page(request, "batches/list.html", context, csrf=current.csrf_token)


def _detail(tenant_id: uuid.UUID, batch_id: str) -> dict[str, Any]:
    with session_scope() as session:
        batch = service.get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
        running = service.running_lines(session, [batch]).get(batch.id, 0)
        failed = [
            JobRead.from_job(job)
            for job in service.list_lines(
                session,
                tenant_id=tenant_id,
                batch_id=batch_id,
                statuses=_UNSUCCESSFUL,
                limit=FAILED_SHOWN,
            )
        ]
        session.expunge_all()
    progress = Progress.of(batch, running, datetime.now(UTC))
    return {
        "batch": batch,
        "progress": progress,
        "failed_lines": failed,
        "failed_shown": FAILED_SHOWN,
        "cancellable": batch.status in ("validating", "in_progress"),
        "retryable": batch.status in ("completed", "expired", "cancelled")
        and batch.request_failed > 0,
    }


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
async def batch_detail(batch_id: str, request: Request, current: SessionDep) -> HTMLResponse:
    """One batch: status, timestamps, counts by outcome, usage, errors, failed lines, files."""
    try:
        context = await run_in_threadpool(_detail, current.caller.tenant_id, _batch_id(batch_id))
    except NotFound:
        raise not_found() from None
    return page(request, "batches/detail.html", context, csrf=current.csrf_token)


def _progress(tenant_id: uuid.UUID, batch_id: str) -> Progress:
    with session_scope() as session:
        batch = service.get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
        running = service.running_lines(session, [batch]).get(batch.id, 0)
        return Progress.of(batch, running, datetime.now(UTC))


@router.get("/batches/{batch_id}/progress")
async def batch_progress(batch_id: str, current: SessionDep) -> JSONResponse:
    """The batch's counts and pace as JSON: what console.js polls while the batch runs."""
    try:
        progress = await run_in_threadpool(_progress, current.caller.tenant_id, _batch_id(batch_id))
    except NotFound:
        raise not_found() from None
    return JSONResponse(asdict(progress))


# --- downloads ----------------------------------------------------------------------------


def _download(tenant_id: uuid.UUID, batch_id: str, kind: str) -> Response:
    with session_scope() as session:
        batch = service.get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
        file_id = batch.output_file_id if kind == "output" else batch.error_file_id
    if file_id is None:
        raise not_found()
    return content_response(tenant_id, file_id)  # GET /v1/files/{id}/content's answer


@router.get("/batches/{batch_id}/output")
async def download_output(batch_id: str, current: SessionDep) -> Response:
    """The batch's output file (its succeeded lines), as an attachment."""
    try:
        return await run_in_threadpool(
            _download, current.caller.tenant_id, _batch_id(batch_id), "output"
        )
    except NotFound:
        raise not_found() from None


@router.get("/batches/{batch_id}/errors")
async def download_errors(batch_id: str, current: SessionDep) -> Response:
    """The batch's error file (its failed, expired and cancelled lines), as an attachment."""
    try:
        return await run_in_threadpool(
            _download, current.caller.tenant_id, _batch_id(batch_id), "errors"
        )
    except NotFound:
        raise not_found() from None


# --- actions ------------------------------------------------------------------------------


def _cancel(tenant_id: uuid.UUID, batch_id: str) -> str:
    try:
        service.cancel(tenant_id=tenant_id, batch_id=batch_id)
    except service.BatchNotCancellable:
        return "batch_not_cancellable"
    return "batch_cancelled"


@router.post("/batches/{batch_id}/cancel")
async def cancel(batch_id: str, current: SessionDep, _: FormDep) -> Response:
    """Cancel the batch (as POST /v1/batches/{id}/cancel); back to its page with the outcome."""
    ident = _batch_id(batch_id)
    try:
        flash = await run_in_threadpool(_cancel, current.caller.tenant_id, ident)
    except NotFound:
        raise not_found() from None
    return see_other(f"{PREFIX}/batches/{ident}?flash={flash}")


def _retry(tenant_id: uuid.UUID, batch_id: str) -> tuple[str, str]:
    # One retry per batch from the console: the key makes a second click (or a resubmitted
    # form) land on the first retry instead of running the failed lines twice.
    try:
        with session_scope() as session:
            batch, created = service.retry_batch(
                session,
                tenant_id=tenant_id,
                batch_id=batch_id,
                idempotency_key=f"ui-retry:{batch_id}",
            )
            new_id = batch.id
    except service.BatchNotCancellable:  # still running (or failed validation): 409
        return batch_id, "batch_not_retryable"
    except InvalidRequest:  # no failed line
        return batch_id, "batch_nothing_to_retry"
    except IdempotencyConflict:  # the key names a batch made otherwise (by the API)
        return batch_id, "batch_retry_key_taken"
    if not created:
        return new_id, "batch_retry_exists"
    service.validate_soon(new_id)  # after the commit, as POST /v1/batches/{id}/retry
    return new_id, "batch_retried"


@router.post("/batches/{batch_id}/retry")
async def retry(batch_id: str, current: SessionDep, _: FormDep) -> Response:
    """A new batch of the failed lines (as POST /v1/batches/{id}/retry); on to its page."""
    ident = _batch_id(batch_id)
    try:
        target, flash = await run_in_threadpool(_retry, current.caller.tenant_id, ident)
    except NotFound:
        raise not_found() from None
    return see_other(f"{PREFIX}/batches/{target}?flash={flash}")
