"""The console's usage page: a range of UTC days, tokens and requests per day stacked by
model as two server-drawn charts (api/ui/charts.py), and the table of the same numbers.

The range goes through chatjobs.usage's own checks (``resolve_range``: end after start, at
most 366 days) and the rows come from ``usage.usage``, as GET /v1/usage's do; a range that
does not parse or is refused re-renders the form with the reason (400), never a 5xx.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from api.routes.schedules import EARLIEST, LATEST
from api.ui.charts import Series, stacked_bars
from api.ui.core import PREFIX, page
from api.ui.session import SessionDep
from chatjobs import usage
from chatjobs.db import session_scope

router = APIRouter(prefix=PREFIX, include_in_schema=False)
GROUPS = ("model", "day")
DEFAULT_DAYS = 7  # today (UTC) and the 6 before it
LAST_DAY = LATEST.date() - timedelta(days=1)


@dataclass(frozen=True)
class Range:
    """The days asked for, both included, as the form shows them."""

    start: date
    end: date

    def instants(self) -> tuple[datetime, datetime]:
        """[start 00:00 UTC, the day after end 00:00 UTC)."""
        return (
            datetime.combine(self.start, time(), UTC),
            datetime.combine(self.end + timedelta(days=1), time(), UTC),
        )


def parse_range(start: str | None, end: str | None, *, today: date) -> tuple[Range, dict[str, str]]:
    """The form's range and its errors by field. Missing fields default to the last
    ``DEFAULT_DAYS`` days; the range is judged by ``usage.resolve_range`` as the API's is."""
    errors: dict[str, str] = {}
    days: dict[str, date | None] = {}
    for name, text in (("start", start), ("end", end)):
        text = (text or "").strip()
        try:
            days[name] = date.fromisoformat(text) if text else None
        except ValueError:
            days[name], errors[name] = None, "must be a date, YYYY-MM-DD"
    for name, day in days.items():
        # The API's bounds for an instant (api.routes.schedules.Instant), as days.
        if day is not None and not EARLIEST.date() <= day < LATEST.date():
            days[name], errors[name] = None, f"must be from {EARLIEST.date()} to {LAST_DAY}"
    last = days["end"] or today
    first = days["start"] or last - timedelta(days=DEFAULT_DAYS - 1)
    shown = Range(first, last)
    if not errors:
        try:
            usage.resolve_range(*shown.instants())
        except usage.UsageQueryError as exc:
            message = "end must not be before start" if exc.param == "end" else exc.message
            errors[exc.param] = message
    return shown, errors


def day_range(start: date, end: date) -> list[date]:
    """Every day from start to end, both included (the chart's categories)."""
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def by_model(rows: list[usage.UsageRow], days: list[date], metric: str) -> list[Series]:
    """One series per model (largest total tokens first, so the palette goes to the biggest),
    with ``metric`` per day, 0 for a day without calls."""
    order = {day: n for n, day in enumerate(days)}
    weight: dict[str, int] = {}
    for row in rows:
        name = row.model or ""
        weight[name] = weight.get(name, 0) + row.total_tokens
    models = sorted(weight, key=lambda name: (-weight[name], name))
    values = {name: [0.0] * len(days) for name in models}
    for row in rows:
        if row.day in order:
            values[row.model or ""][order[row.day]] += getattr(row, metric)
    return [Series(name, values[name]) for name in models]


@dataclass(frozen=True)
class Totals:
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None  # of the priced rows; None if none is priced
    unpriced: bool  # some row has no price
    offloaded_tokens: int = 0
    offload_saving_usd: float | None = None  # of the priced rows


def totals(rows: list[usage.UsageRow]) -> Totals:
    priced = [row.cost_usd for row in rows if row.cost_usd is not None]
    return Totals(
        requests=sum(row.requests for row in rows),
        failures=sum(row.failures for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        total_tokens=sum(row.total_tokens for row in rows),
        cost_usd=round(sum(priced), 6) if priced else None,
        unpriced=len(priced) < len(rows),
        offloaded_tokens=sum(row.offloaded_tokens for row in rows),
        offload_saving_usd=round(sum(row.offload_saving_usd or 0.0 for row in rows), 6)
        if priced
        else None,
    )


def _rows(tenant_id: uuid.UUID, shown: Range) -> list[usage.UsageRow]:
    start, end = shown.instants()
    with session_scope() as session:
        return usage.usage(
            session=session, tenant_id=tenant_id, start=start, end=end, group_by=GROUPS
        )


CHARTS = (("total_tokens", "Tokens per day, by model"), ("requests", "Requests per day, by model"))


def _charts(rows: list[usage.UsageRow], shown: Range) -> list[tuple[str, Markup]]:
    """(caption, SVG) for each chart; every day of the range is a category, empty or not."""
    days = day_range(shown.start, shown.end)
    labels = [day.isoformat() for day in days]
    return [
        (caption, stacked_bars(labels, by_model(rows, days, metric), label=caption))
        for metric, caption in CHARTS
    ]


@router.get("/usage", response_class=HTMLResponse)
async def usage_page(request: Request, current: SessionDep) -> HTMLResponse:
    """Tokens and requests per UTC day and model over a range of days, charted and tabled."""
    query = request.query_params
    shown, errors = parse_range(
        query.get("start"), query.get("end"), today=datetime.now(UTC).date()
    )
    rows: list[usage.UsageRow] = []
    if not errors:
        try:
            rows = await run_in_threadpool(_rows, current.caller.tenant_id, shown)
        except usage.UsageQueryError as exc:  # more groups than usage.MAX_ROWS
            errors[exc.param] = exc.message
    context = {
        "range": shown,
        "form": {"start": query.get("start", shown.start), "end": query.get("end", shown.end)},
        "errors": errors,
        "rows": rows,
        "totals": totals(rows),
        "charts": [] if errors else _charts(rows, shown),
    }
    return page(
        request, "usage/page.html", context, status=400 if errors else 200, csrf=current.csrf_token
    )
