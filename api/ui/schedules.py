"""The console's schedules pages: the list with next fire times and last firings, one
schedule in full (settings, template, next fire times, firings) and its actions (pause,
resume, trigger now). Each handler calls the same chatjobs.schedules.service functions as
the /v1/schedules routes, and shows their read shapes (``ScheduleObject``, ``FiringObject``),
so the next fire times are the API's."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.routes.schedules import FiringObject, ScheduleObject, ScheduleUpdate
from api.ui.core import PREFIX, not_found, page, see_other
from api.ui.jobs import conversation
from api.ui.session import FormDep, SessionDep
from chatjobs.db import session_scope
from chatjobs.errors import Conflict, InvalidRequest, NotFound
from chatjobs.schedules import cron, service

router = APIRouter(prefix=PREFIX, include_in_schema=False)
PAGE_SIZE = 20  # schedules a page, firings a page (the API's default)
LAST_FIRINGS = 3  # firings shown per schedule in the list
_SCHEDULE_ID = re.compile(r"sched_[0-9a-f]{32}")


def zoned(moment: datetime, timezone: str) -> str:
    """An instant as wall time in the schedule's zone, with UTC beside it:
    ``2026-12-02 07:00 Europe/Berlin (06:00 UTC)`` (the UTC date too when it differs; seconds
    only when there are some, as for a trigger)."""
    fmt = "%Y-%m-%d %H:%M" if moment.second == moment.microsecond == 0 else "%Y-%m-%d %H:%M:%S"
    utc = moment.astimezone(UTC)
    try:
        local = moment.astimezone(ZoneInfo(timezone))
    except (ValueError, KeyError):  # a zone gone from tzdata: UTC alone
        return f"{utc.strftime(fmt)} UTC"
    if timezone == "UTC":
        return f"{utc.strftime(fmt)} UTC"
    shown = utc.strftime(fmt if utc.date() != local.date() else fmt.removeprefix("%Y-%m-%d "))
    return f"{local.strftime(fmt)} {timezone} ({shown} UTC)"


def _schedule_id(raw: str) -> str:
    if not _SCHEDULE_ID.fullmatch(raw):
        raise not_found()
    return raw


def _uuid(raw: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw) if raw else None
    except ValueError:
        return None


# --- the list ----------------------------------------------------------------------------


def _list(
    tenant_id: uuid.UUID, after: str | None
) -> tuple[list[tuple[ScheduleObject, list[FiringObject]]], bool]:
    with session_scope() as session:
        rows, has_more = service.list_schedules(
            session, tenant_id=tenant_id, after=after, limit=PAGE_SIZE
        )
        out = []
        for schedule in rows:
            firings, _ = service.list_firings(
                session,
                tenant_id=tenant_id,
                schedule_id=schedule.id,
                after=None,
                limit=LAST_FIRINGS,
            )
            out.append((ScheduleObject.of(schedule), [FiringObject.of(f) for f in firings]))
        return out, has_more


@router.get("/schedules", response_class=HTMLResponse)
async def schedule_list(request: Request, current: SessionDep) -> HTMLResponse:
    """The tenant's schedules, newest first, a page at a time, as GET /v1/schedules."""
    raw = request.query_params.get("after") or None
    after = raw if raw and _SCHEDULE_ID.fullmatch(raw) else None
    rows, has_more = await run_in_threadpool(_list, current.caller.tenant_id, after)
    return page(
        request,
        "schedules/list.html",
        {
            "schedules": rows,
            "zoned": zoned,
            "next_after": rows[-1][0].id if has_more and rows else None,
            "paged": after is not None,
        },
        csrf=current.csrf_token,
    )


# --- one schedule ------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _detail(tenant_id: uuid.UUID, schedule_id: str, after: uuid.UUID | None) -> dict[str, Any]:
    with session_scope() as session:
        schedule = ScheduleObject.of(
            service.get_schedule(session, tenant_id=tenant_id, schedule_id=schedule_id)
        )
        rows, has_more = service.list_firings(
            session, tenant_id=tenant_id, schedule_id=schedule_id, after=after, limit=PAGE_SIZE
        )
        firings = [FiringObject.of(read) for read in rows]
    template = schedule.template
    request = template.get("request") if schedule.kind == "job" else None
    request = request if isinstance(request, dict) else None
    rest = {k: v for k, v in template.items() if k != "request"} if request else template
    return {
        "schedule": schedule,
        "firings": firings,
        "next_after": firings[-1].id if has_more and firings else None,
        "paged": after is not None,
        "messages": conversation(request) if request else [],
        "params": {k: _json(v) for k, v in (request or {}).items() if k != "messages"},
        "template_rest": _json(rest) if rest else None,
        "metadata_json": _json(schedule.metadata) if schedule.metadata else None,
        "zoned": zoned,
    }


@router.get("/schedules/{schedule_id}", response_class=HTMLResponse)
async def schedule_detail(schedule_id: str, request: Request, current: SessionDep) -> HTMLResponse:
    """One schedule: its settings, template, next fire times and firings (paged)."""
    ident = _schedule_id(schedule_id)
    after = _uuid(request.query_params.get("after"))
    try:
        context = await run_in_threadpool(_detail, current.caller.tenant_id, ident, after)
    except NotFound:
        raise not_found() from None
    # After "trigger now": the firing it made, if on this page (an id, never text).
    fired_id = _uuid(request.query_params.get("fired"))
    context["fired"] = next((f for f in context["firings"] if f.id == fired_id), None)
    return page(request, "schedules/detail.html", context, csrf=current.csrf_token)


# --- actions -----------------------------------------------------------------------------


def _set_paused(tenant_id: uuid.UUID, schedule_id: str, paused: bool, note: str) -> str:
    changes: dict[str, Any] = {"paused": paused}
    if paused and note:
        changes["note"] = note
    try:
        with session_scope() as session:
            # Found first (another tenant's is a 404 whatever the note), then the API's body
            # rules for the same change (a note of at most 1000 storable characters).
            schedule = service.get_schedule(session, tenant_id=tenant_id, schedule_id=schedule_id)
            try:
                ScheduleUpdate.model_validate(changes)
            except ValidationError:
                return "note_invalid"
            if schedule.paused == paused:
                return "already_paused" if paused else "not_paused"
            service.update_schedule(
                session, tenant_id=tenant_id, schedule_id=schedule_id, changes=changes
            )
    except (cron.InvalidSchedule, InvalidRequest, Conflict):
        return "schedule_refused"
    return "paused" if paused else "resumed"


@router.post("/schedules/{schedule_id}/pause")
async def pause(schedule_id: str, current: SessionDep, form: FormDep) -> Response:
    """Pause (as PATCH /v1/schedules/{id} with paused and note); back with the outcome."""
    ident = _schedule_id(schedule_id)
    note = form.get("note", "").strip()
    try:
        flash = await run_in_threadpool(_set_paused, current.caller.tenant_id, ident, True, note)
    except NotFound:
        raise not_found() from None
    return see_other(f"{PREFIX}/schedules/{ident}?flash={flash}")


@router.post("/schedules/{schedule_id}/resume")
async def resume(schedule_id: str, current: SessionDep, _: FormDep) -> Response:
    """Resume from now (as PATCH with paused false): times passed while paused do not fire."""
    ident = _schedule_id(schedule_id)
    try:
        flash = await run_in_threadpool(_set_paused, current.caller.tenant_id, ident, False, "")
    except NotFound:
        raise not_found() from None
    return see_other(f"{PREFIX}/schedules/{ident}?flash={flash}")


_TRIGGERED = {
    "fired": "triggered",
    "buffered": "trigger_buffered",
    "skipped": "trigger_skipped",
    "failed": "trigger_failed",
}


def _trigger(tenant_id: uuid.UUID, schedule_id: str) -> tuple[str, uuid.UUID | None]:
    try:
        with session_scope() as session:
            firing, fired = service.trigger(session, tenant_id=tenant_id, schedule_id=schedule_id)
            flash, firing_id = _TRIGGERED.get(firing.status, "triggered"), firing.id
    except (cron.InvalidSchedule, InvalidRequest, Conflict):
        return "schedule_refused", None
    fired.after_commit()  # as the API's trigger: poke the dispatcher once committed
    return flash, firing_id


@router.post("/schedules/{schedule_id}/trigger")
async def trigger(schedule_id: str, current: SessionDep, _: FormDep) -> Response:
    """Fire once now (as POST /v1/schedules/{id}/trigger); back with the firing shown."""
    ident = _schedule_id(schedule_id)
    try:
        flash, firing_id = await run_in_threadpool(_trigger, current.caller.tenant_id, ident)
    except NotFound:
        raise not_found() from None
    fired = f"&fired={firing_id}" if firing_id else ""
    return see_other(f"{PREFIX}/schedules/{ident}?flash={flash}{fired}")
