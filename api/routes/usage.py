"""/v1/usage: the tenant's upstream calls and tokens over a range, by model and/or UTC day."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, Field

from api.deps import TenantDep
from api.openapi import V1_ERRORS, errors
from api.routes.schedules import Instant
from chatjobs import usage
from chatjobs.db import session_scope

# Pydantic would also take a number (Unix seconds) or a date alone: only RFC 3339 is asked for.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _rfc3339(value: object) -> object:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be RFC 3339 with a zone, e.g. 2026-06-01T00:00:00Z")
    return value


Moment = Annotated[Instant, BeforeValidator(_rfc3339)]

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=V1_ERRORS)


class UsageRead(BaseModel):
    """One group's totals; ``model`` and ``day`` only when grouped by them."""

    model: str | None = None
    day: date | None = Field(None, description="the UTC day of the calls")
    requests: int = Field(description="upstream calls, retries included")
    failures: int = Field(description="calls without a 2xx answer (error, timeout, no answer)")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_requests: int = Field(
        0, description="calls an AI Gateway answered from its cache (counted in requests too)"
    )
    cached_tokens: int = Field(
        0, description="total tokens of the cached calls: returned, not billed by the provider"
    )
    billed_tokens: int = Field(0, description="total_tokens without cached_tokens")
    estimated_requests: int = Field(
        0, description="calls whose usage chatjobs counted itself (the provider reported none)"
    )
    offloaded_requests: int = Field(
        0, description="calls made through the provider's batch API (counted in requests too)"
    )
    offloaded_tokens: int = Field(0, description="total tokens of the offloaded calls")
    cost_usd: float | None = Field(
        None,
        description="rows grouped by model: from the models file's input_per_mtok and "
        "output_per_mtok, on billed tokens only (cached calls cost nothing; offloaded calls at "
        "the route's offload_discount off), null where the model has no prices",
    )
    offload_saving_usd: float | None = Field(
        None,
        description="rows grouped by model: what offloading saved against the synchronous "
        "price, null where the model has no prices",
    )

    @classmethod
    def of(cls, row: usage.UsageRow, group_by: tuple[str, ...]) -> UsageRead:
        fields: dict[str, object] = {
            "requests": row.requests,
            "failures": row.failures,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.total_tokens,
            "cached_requests": row.cached_requests,
            "cached_tokens": row.cached_tokens,
            "billed_tokens": row.billed_tokens,
            "estimated_requests": row.estimated_requests,
            "offloaded_requests": row.offloaded_requests,
            "offloaded_tokens": row.offloaded_tokens,
        }
        if "model" in group_by:
            fields |= {
                "model": row.model,
                "cost_usd": row.cost_usd,
                "offload_saving_usd": row.offload_saving_usd,
            }
        if "day" in group_by:
            fields["day"] = row.day
        return cls.model_validate(fields)


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageRead]
    start: datetime
    end: datetime
    group_by: list[Literal["model", "day"]]


@router.get(
    "",
    response_model=UsageList,
    response_model_exclude_unset=True,
    responses=errors(
        422,
        described={
            422: "A parameter does not validate, end is not after start, the range is over "
            "366 days, or it holds more than 10,000 groups (`invalid_request_error`, `param` "
            "names the parameter)."
        },
    ),
)
def get_usage(
    tenant_id: TenantDep,
    start: Annotated[
        Moment | None, Query(description="RFC 3339 with a zone; default: 7 days before end")
    ] = None,
    end: Annotated[Moment | None, Query(description="RFC 3339 with a zone; default: now")] = None,
    group_by: Annotated[
        str,
        Query(
            max_length=64,
            pattern=r"^((model|day)(,(model|day))?)?$",
            description="`model`, `day`, both (`model,day`), or empty for one total row",
        ),
    ] = "model,day",
) -> UsageList:
    """The tenant's upstream calls made in [start, end): requests, failures and tokens."""
    try:
        groups = usage.parse_group_by(group_by)
        start, end = usage.resolve_range(start, end)
        with session_scope() as session:
            rows = usage.usage(
                session=session, tenant_id=tenant_id, start=start, end=end, group_by=groups
            )
    except usage.UsageQueryError as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", exc.param), "msg": exc.message}]
        ) from exc
    return UsageList(
        object="list",  # set, so response_model_exclude_unset keeps it
        data=[UsageRead.of(row, groups) for row in rows],
        start=start,
        end=end,
        group_by=list(groups),
    )
