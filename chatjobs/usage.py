"""Usage accounting: a tenant's upstream calls and tokens over a time range, grouped by model
and/or UTC day, priced from the models file where it has prices.

One grouped query over ``upstream_calls`` (every call, retries included, whatever its
outcome) joined to ``jobs`` for the tenant. A failure is a call without a 2xx answer: an
error status, or none at all (timeout, connection error).

Token columns count what the upstream returned, for every call. A call an AI Gateway answered
from its cache returned usage but was not billed by the provider: those calls are also
counted apart (``cached_requests``, ``cached_tokens``), ``billed_tokens`` is the total
without them, and the cost is priced on billed tokens only. ``estimated_requests`` counts
calls whose usage chatjobs counted itself because the provider reported none.

A call made through a provider's batch API (chatjobs.offload) is billed at the route's
``offload_discount`` off the synchronous price (OpenAI and Anthropic: 50 %): those calls are
counted apart too (``offloaded_requests``, ``offloaded_tokens``), ``cost_usd`` prices them at
the discounted price, and ``offload_saving_usd`` is what the discount saved.

The output is bounded: at most ``MAX_ROWS`` groups, else ``UsageQueryError`` asks for a
narrower range.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, and_, cast, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Label

from chatjobs.errors import TenantNotFound
from chatjobs.models import Tenant, UpstreamCall
from chatjobs.routing import OFFLOAD_DISCOUNT, model_entries

GROUPS = ("model", "day")
DEFAULT_SPAN = timedelta(days=7)
MAX_SPAN = timedelta(days=366)
MAX_ROWS = 10_000


class UsageQueryError(ValueError):
    """A usage query the API answers with 422: ``param`` names the parameter at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.param, self.message))


@dataclass(frozen=True)
class UsageRow:
    """One group's totals; ``model`` and ``day`` are None when not grouped by them."""

    model: str | None
    day: date | None
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    cached_requests: int = 0
    cached_tokens: int = 0
    estimated_requests: int = 0
    offloaded_requests: int = 0
    offloaded_tokens: int = 0
    offload_saving_usd: float | None = None

    @property
    def billed_tokens(self) -> int:
        return self.total_tokens - self.cached_tokens


def parse_group_by(text: str) -> tuple[str, ...]:
    """``model,day`` (either, both, or empty for one total row), in canonical order."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = names - set(GROUPS)
    if unknown:
        raise UsageQueryError(
            "group_by", f"unknown group {sorted(unknown)[0]!r}: use model, day or both"
        )
    return tuple(g for g in GROUPS if g in names)


def resolve_range(
    start: datetime | None, end: datetime | None, *, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The range asked for, in UTC: ``end`` defaults to now, ``start`` to 7 days before it."""
    end = (end or now or datetime.now(UTC)).astimezone(UTC)
    start = (start or end - DEFAULT_SPAN).astimezone(UTC)
    if end <= start:
        raise UsageQueryError("end", "end must be after start")
    if end - start > MAX_SPAN:
        raise UsageQueryError("start", "the range from start to end must be at most 366 days")
    return start, end


def price(model: str) -> tuple[float, float] | None:
    """USD per million input and output tokens, from the model's table, else the ``*``
    table; None where neither has prices."""
    entries = model_entries()
    for entry in (entries.get(model), entries.get("*")):
        if entry is not None and entry.input_per_mtok is not None:
            # ModelEntry sets both prices or neither.
            return entry.input_per_mtok, entry.output_per_mtok or 0.0
    return None


def cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    prices = price(model)
    if prices is None:
        return None
    return round(prompt_tokens / 1e6 * prices[0] + completion_tokens / 1e6 * prices[1], 6)


def usage(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    start: datetime,
    end: datetime,
    group_by: tuple[str, ...],
) -> list[UsageRow]:
    """The tenant's calls made in [start, end), grouped by ``group_by``, by day then model.

    UsageQueryError (naming ``start``) when there are more than MAX_ROWS groups."""
    c = UpstreamCall
    keys: list[Label[Any]] = []
    if "day" in group_by:
        keys.append(cast(func.timezone("UTC", c.created_at), Date).label("day"))
    if "model" in group_by:
        keys.append(c.model.label("model"))
    failed = or_(c.status_code.is_(None), c.status_code < 200, c.status_code > 299)
    stmt = (
        select(
            *keys,
            func.count().label("requests"),
            func.count().filter(failed).label("failures"),
            func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(c.total_tokens), 0).label("total_tokens"),
            func.count().filter(c.cached).label("cached_requests"),
            _cached_sum(c.prompt_tokens, "cached_prompt_tokens"),
            _cached_sum(c.completion_tokens, "cached_completion_tokens"),
            _cached_sum(c.total_tokens, "cached_tokens"),
            func.count().filter(c.usage_estimated).label("estimated_requests"),
            func.count().filter(c.offloaded).label("offloaded_requests"),
            _offloaded_sum(c.prompt_tokens, "offloaded_prompt_tokens"),
            _offloaded_sum(c.completion_tokens, "offloaded_completion_tokens"),
            _offloaded_sum(c.total_tokens, "offloaded_tokens"),
        )
        # ix_upstream_calls_tenant_id_created_at: bounded by the range, not the tenant's jobs.
        .where(and_(c.tenant_id == tenant_id, c.created_at >= start, c.created_at < end))
        .group_by(*keys)
        .order_by(*keys)
        .limit(MAX_ROWS + 1)
    )
    rows = session.execute(stmt).mappings().all()
    if len(rows) > MAX_ROWS:
        raise UsageQueryError(
            "start", f"more than {MAX_ROWS} groups: ask for a narrower range or fewer groups"
        )
    out = []
    for row in rows:
        model = row["model"] if "model" in group_by else None
        prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
        billed_prompt = prompt - int(row["cached_prompt_tokens"])
        billed_completion = completion - int(row["cached_completion_tokens"])
        saving = None
        if model is not None:
            saving = offload_saving(
                model, int(row["offloaded_prompt_tokens"]), int(row["offloaded_completion_tokens"])
            )
        full = cost(model, billed_prompt, billed_completion) if model is not None else None
        out.append(
            UsageRow(
                model=model,
                day=row["day"] if "day" in group_by else None,
                requests=int(row["requests"]),
                failures=int(row["failures"]),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=int(row["total_tokens"]),
                cost_usd=None if full is None else round(full - (saving or 0.0), 6),
                cached_requests=int(row["cached_requests"]),
                cached_tokens=int(row["cached_tokens"]),
                estimated_requests=int(row["estimated_requests"]),
                offloaded_requests=int(row["offloaded_requests"]),
                offloaded_tokens=int(row["offloaded_tokens"]),
                offload_saving_usd=saving,
            )
        )
    return out


def offload_saving(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """What offloading these tokens saved: the synchronous price times the route's
    ``offload_discount``; None where the model has no prices."""
    full = cost(model, prompt_tokens, completion_tokens)
    if full is None:
        return None
    entries = model_entries()
    discount = OFFLOAD_DISCOUNT
    for entry in (entries.get(model), entries.get("*")):
        if entry is not None and entry.offload_discount is not None:
            discount = entry.offload_discount
            break
    return round(full * discount, 6)


def _offloaded_sum(column: Any, name: str) -> Label[Any]:
    return func.coalesce(func.sum(column).filter(UpstreamCall.offloaded), 0).label(name)


def _cached_sum(column: Any, name: str) -> Label[Any]:
    return func.coalesce(func.sum(column).filter(UpstreamCall.cached), 0).label(name)


def tenant_id(*, session: Session, name: str) -> uuid.UUID:
    """The id of the tenant of that name; TenantNotFound if none."""
    found = session.scalar(select(Tenant.id).where(Tenant.name == name))
    if found is None:
        raise TenantNotFound(f"no tenant {name!r}")
    return found
