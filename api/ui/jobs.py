"""The console's jobs pages: the filterable list, one job in full, its actions (cancel,
redeliver a webhook) and its live status (the list polls the statuses of its unfinished rows
as JSON; a job's page listens to the job's event stream). Each handler calls the same
chatjobs functions as the /v1/jobs routes, in one session; only the rendering differs."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from api import streams
from api.routes.schedules import EARLIEST, LATEST
from api.ui.core import LONG_TEXT, PREFIX, SignInRequired, not_found, page, see_other
from api.ui.session import FormDep, SessionDep, signed_in
from chatjobs import deliveries, jobs
from chatjobs.db import session_scope
from chatjobs.errors import (
    DeliveryInProgress,
    JobNotCancellable,
    NotFound,
    WebhookUrlDisabled,
)
from chatjobs.models import Job, JobStatus
from chatjobs.schemas import JobError, JobRead, StepRead, Usage

router = APIRouter(prefix=PREFIX, include_in_schema=False)
PAGE_SIZE = 50
# The steps and the upstream calls a job's page lists, each; the API has them all.
SHOWN = 200


@router.get("")
async def home(_: SessionDep) -> Response:
    """The console opens on the jobs list."""
    return see_other(f"{PREFIX}/jobs")


# --- the list --------------------------------------------------------------------------


@dataclass
class Filters:
    """The list's filters as the query string gave them; ``invalid`` names the ones ignored."""

    status: JobStatus | None = None
    model: str | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    created_from: date | None = None
    created_to: date | None = None
    after: uuid.UUID | None = None
    limit: int | None = None  # PAGE_SIZE unless given (1-100, as the API's)
    invalid: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, query: dict[str, str]) -> Filters:
        """Read the filters, ignoring (and naming) a value that does not parse."""
        out = cls()
        text = {name: (query.get(name) or "").strip() for name in _FIELDS}
        for name in ("model", "batch_id", "schedule_id"):
            setattr(out, name, text[name][:200] or None)
        parsers: dict[str, Any] = {
            "status": JobStatus,
            "created_from": _day,
            "created_to": _day,
            "after": uuid.UUID,
            "limit": _page_size,
        }
        for name, parse in parsers.items():
            if text[name]:
                try:
                    setattr(out, name, parse(text[name]))
                except ValueError:
                    out.invalid.append(name)
        return out

    def query(self, **changes: Any) -> str:
        """This list's query string with ``changes`` (None drops a filter): for links."""
        values = {name: getattr(self, name) for name in _FIELDS} | changes
        kept = {name: str(value) for name, value in values.items() if value is not None}
        return "&".join(f"{name}={quote(value, safe='')}" for name, value in kept.items())

    def window(self) -> tuple[datetime | None, datetime | None]:
        """The created range as instants: from the start of ``created_from`` (UTC) to the end
        of ``created_to``."""
        start = datetime.combine(self.created_from, time(), UTC) if self.created_from else None
        end = (
            datetime.combine(self.created_to + timedelta(days=1), time(), UTC)
            if self.created_to
            else None
        )
        return start, end


_FIELDS = (
    "status",
    "model",
    "batch_id",
    "schedule_id",
    "created_from",
    "created_to",
    "after",
    "limit",
)


def _day(text: str) -> date:
    # The instants the API takes (api/routes/schedules.py): the day after 9999-12-31 is
    # past datetime's range, and nothing was created before the epoch anyway.
    day = date.fromisoformat(text)
    if not EARLIEST.date() <= day < LATEST.date():
        raise ValueError(text)
    return day


def _page_size(text: str) -> int:
    size = int(text)
    if not 1 <= size <= 100:
        raise ValueError(text)
    return size


def _list(tenant_id: uuid.UUID, filters: Filters) -> tuple[list[JobRead], bool]:
    start, end = filters.window()
    with session_scope() as session:
        rows, has_more = jobs.list_jobs(
            session=session,
            tenant_id=tenant_id,
            status=filters.status,
            model=filters.model,
            batch_id=filters.batch_id,
            schedule_id=filters.schedule_id,
            created_after=start,
            created_before=end,
            after=filters.after,
            limit=filters.limit or PAGE_SIZE,
        )
        return [JobRead.from_job(job) for job in rows], has_more


@router.get("/jobs", response_class=HTMLResponse)
async def job_list(request: Request, current: SessionDep) -> HTMLResponse:
    """The tenant's jobs, newest first, filtered, a page at a time."""
    filters = Filters.parse(dict(request.query_params))
    rows, has_more = await run_in_threadpool(_list, current.caller.tenant_id, filters)
    return page(
        request,
        "jobs/list.html",
        {
            "jobs": rows,
            "filters": filters,
            "statuses": list(JobStatus),
            "next_query": filters.query(after=rows[-1].id) if has_more and rows else None,
            "first_query": filters.query(after=None) if filters.after else None,
        },
        csrf=current.csrf_token,
    )


def _statuses(tenant_id: uuid.UUID, ids: list[uuid.UUID]) -> dict[str, str]:
    with session_scope() as session:
        found = jobs.statuses(session=session, tenant_id=tenant_id, ids=ids)
    return {str(ident): status.value for ident, status in found.items()}


@router.get("/jobs/statuses")
async def job_statuses(request: Request, current: SessionDep) -> JSONResponse:
    """The status of each ``id`` (at most a page of them) that is one of the tenant's jobs, as
    JSON ``{"<id>": "<status>"}``, for the list's script; another tenant's id is absent."""
    raw = request.query_params.getlist("id")
    if len(raw) > PAGE_SIZE:
        return JSONResponse({"error": f"at most {PAGE_SIZE} ids"}, status_code=400)
    try:
        ids = [uuid.UUID(value) for value in raw]
    except ValueError:
        return JSONResponse({"error": "each id must be a job id"}, status_code=400)
    found = await run_in_threadpool(_statuses, current.caller.tenant_id, ids)
    return JSONResponse(found, headers={"cache-control": "no-store"})


# --- one job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text part as the page carries it: its first LONG_TEXT characters, and its length (a
    document sent for map-reduce would otherwise be the whole page)."""

    start: str
    length: int

    @classmethod
    def of(cls, text: str) -> Text:
        return cls(text[:LONG_TEXT], len(text))

    @property
    def cut(self) -> bool:
        return self.length > len(self.start)


@dataclass(frozen=True)
class Message:
    """One message of a request as the conversation shows it: text parts as text (cut at
    LONG_TEXT), any other part by its type (an image is named, never fetched)."""

    role: str
    texts: list[Text]
    others: list[str]
    extra: str | None  # tool_calls, name, tool_call_id...: as JSON


def conversation(request: dict[str, Any]) -> list[Message]:
    """The request's messages, whatever shape each one has (stored requests are validated at
    submission, but a page must never fail on one)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return []
    out = []
    for raw in messages:
        if not isinstance(raw, dict):
            out.append(Message("?", [], [], _json(raw)))
            continue
        content = raw.get("content")
        texts: list[Text] = []
        others: list[str] = []
        if isinstance(content, str):
            texts.append(Text.of(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(Text.of(str(part.get("text", ""))))
                elif isinstance(part, dict):
                    others.append(str(part.get("type", "unknown")))
                else:
                    others.append(type(part).__name__)
        elif content is not None:
            texts.append(Text.of(_json(content)))
        rest = {k: v for k, v in raw.items() if k not in ("role", "content")}
        out.append(Message(str(raw.get("role", "?")), texts, others, _json(rest) if rest else None))
    return out


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def answer(result: dict[str, Any] | None) -> list[dict[str, str | None]]:
    """Each choice of a chat completion: its text and its tool calls (as JSON)."""
    choices = (result or {}).get("choices")
    if not isinstance(choices, list):
        return []
    out: list[dict[str, str | None]] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        tools = message.get("tool_calls")
        out.append(
            {
                "content": content if isinstance(content, str) else None,
                "tool_calls": _json(tools) if tools else None,
                "finish_reason": str(choice.get("finish_reason") or "") or None,
            }
        )
    return out


def step_tree(steps: list[StepRead]) -> list[tuple[str, list[StepRead]]]:
    """Steps grouped by stage, in order: the map, then each reduce level."""
    stages: dict[str, list[StepRead]] = {}
    for step in steps:
        name = "map" if step.kind == "map" else f"{step.kind} level {step.level}"
        stages.setdefault(name, []).append(step)
    return list(stages.items())


def step_row(job: Job) -> StepRead:
    """A step as its row in the page's table, from the summary columns only (no result:
    ``StepRead.from_job`` reads it)."""
    return StepRead(
        id=job.id,
        kind=job.step_kind or "",
        level=job.step_level or 0,
        index=job.step_index or 0,
        status=job.status,
        attempts=job.attempts,
        content=None,
        usage=Usage(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            total_tokens=job.total_tokens,
        ),
        error=JobError.from_stored(job.error),
        completed_at=job.completed_at,
    )


def _detail(tenant_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
    with session_scope() as session:
        row = jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        job = JobRead.from_job(row)
        # The job read once, above; its steps and calls capped at SHOWN each.
        shown = jobs.list_steps(
            session=session, tenant_id=tenant_id, job_id=job_id, job=row, limit=SHOWN
        )
        steps = sorted((step_row(s) for s in shown), key=lambda s: (s.level, s.index))
        calls = jobs.list_calls(
            session=session, tenant_id=tenant_id, job_id=job_id, job=row, limit=SHOWN
        )
        totals = (len(steps), len(calls))
        if SHOWN in totals:
            totals = jobs.count_steps_and_calls(session=session, tenant_id=tenant_id, job_id=job_id)
        sent = deliveries.list_for_job(session, tenant_id, job_id)
        attempts = deliveries.attempts_for(session, [d.id for d in sent])
        session.expunge_all()  # read after the session closes
    params = {k: _json(v) for k, v in job.request.items() if k != "messages"}
    return {
        "job": job,
        "messages": conversation(job.request),
        "params": params,
        "answers": answer(job.result),
        "result_json": _json(job.result) if job.result is not None else None,
        "metadata_json": _json(job.metadata) if job.metadata else None,
        "stages": step_tree(steps),
        "steps_shown": len(steps),
        "steps_total": totals[0],
        "calls": calls,
        "calls_total": totals[1],
        "deliveries": [(d, [a for a in attempts if a.delivery_id == d.id]) for d in sent],
    }


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise not_found() from None


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_detail(job_id: str, request: Request, current: SessionDep) -> HTMLResponse:
    """One job: its conversation, result, usage, calls, deliveries and steps."""
    try:
        context = await run_in_threadpool(_detail, current.caller.tenant_id, _job_id(job_id))
    except NotFound:
        raise not_found() from None
    return page(request, "jobs/detail.html", context, csrf=current.csrf_token)


def _cancel(tenant_id: uuid.UUID, job_id: uuid.UUID) -> str:
    try:
        with session_scope() as session:
            jobs.cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
    except JobNotCancellable:
        return "not_cancellable"
    return "cancelled"


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, current: SessionDep, _: FormDep) -> Response:
    """Cancel the job (as POST /v1/jobs/{id}/cancel); back to its page with the outcome."""
    ident = _job_id(job_id)
    try:
        flash = await run_in_threadpool(_cancel, current.caller.tenant_id, ident)
    except NotFound:
        raise not_found() from None
    return see_other(f"{PREFIX}/jobs/{ident}?flash={flash}")


def _redeliver(tenant_id: uuid.UUID, job_id: uuid.UUID, delivery_id: uuid.UUID) -> str:
    try:
        with session_scope() as session:
            deliveries.redeliver(session, tenant_id, job_id, delivery_id)
    except DeliveryInProgress:
        return "delivery_in_progress"
    except WebhookUrlDisabled:
        return "url_disabled"
    return "redelivering"


@router.post("/jobs/{job_id}/deliveries/{delivery_id}/redeliver")
async def redeliver(job_id: str, delivery_id: str, current: SessionDep, _: FormDep) -> Response:
    """Send a webhook delivery again under its webhook-id (as the /v1 redeliver route)."""
    ident, delivery = _job_id(job_id), _job_id(delivery_id)
    try:
        flash = await run_in_threadpool(_redeliver, current.caller.tenant_id, ident, delivery)
    except NotFound:
        raise not_found() from None
    return see_other(f"{PREFIX}/jobs/{ident}?flash={flash}")


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, current: SessionDep) -> Response:
    """The job's server-sent events for the page's script: GET /v1/jobs/{id}/events's stream,
    authenticated by the session instead of a key, its status events only the status, and
    ended once the session is (signed out, expired, its key revoked)."""

    async def still_signed_in() -> bool:
        try:
            await signed_in(request)
        except SignInRequired:
            return False
        return True

    try:
        return await streams.job_events(
            _job_id(job_id), current.caller, request, slim=True, still_allowed=still_signed_in
        )
    except NotFound:
        raise not_found() from None
