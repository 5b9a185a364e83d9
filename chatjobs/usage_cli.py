"""`chatjobs usage --tenant NAME`: a tenant's calls, tokens and cost, read from the database
(an operator command, like `chatjobs tenants list`; the API's GET /v1/usage for clients)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.table import Table

from chatjobs.batch_cli import console
from chatjobs.usage import UsageRow


def _count(value: int) -> str:
    return f"{value:,}"


def _cost(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def table(rows: list[UsageRow], group_by: tuple[str, ...]) -> Table:
    """The rows, then a total row (its cost: the priced models' only)."""
    out = Table(*group_by, "requests", "failures", "prompt", "completion", "total")
    priced = "model" in group_by
    if priced:
        out.add_column("cost usd")
    for row in rows if group_by else []:  # ungrouped, the one row is the total
        keys = [(row.model or "") if g == "model" else str(row.day) for g in group_by]
        out.add_row(*keys, *_numbers(row), *([_cost(row.cost_usd)] if priced else []))
    total = UsageRow(
        model=None,
        day=None,
        requests=sum(r.requests for r in rows),
        failures=sum(r.failures for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        total_tokens=sum(r.total_tokens for r in rows),
        cost_usd=round(sum(r.cost_usd or 0.0 for r in rows), 6),
    )
    if group_by:
        out.add_section()
    labels = ["total", *[""] * (len(group_by) - 1)] if group_by else []
    out.add_row(*labels, *_numbers(total), *([_cost(total.cost_usd)] if priced else []))
    return out


def _numbers(row: UsageRow) -> list[str]:
    return [
        _count(n)
        for n in (
            row.requests,
            row.failures,
            row.prompt_tokens,
            row.completion_tokens,
            row.total_tokens,
        )
    ]


def run(ns: argparse.Namespace) -> None:
    from chatjobs import usage
    from chatjobs.db import session_scope
    from chatjobs.errors import TenantNotFound

    end = datetime.now(UTC)
    try:
        group_by = usage.parse_group_by(ns.group_by)
        start, end = usage.resolve_range(end - ns.since, end)
        with session_scope() as session:
            tenant = usage.tenant_id(session=session, name=ns.tenant)
            rows = usage.usage(
                session=session, tenant_id=tenant, start=start, end=end, group_by=group_by
            )
    except usage.UsageQueryError as exc:
        sys.exit(f"chatjobs usage: {exc.message}")
    except TenantNotFound as exc:
        sys.exit(f"chatjobs usage: {exc}")
    out = console()
    out.print(f"tenant {ns.tenant}, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    out.print(table(rows, group_by))
    if "model" in group_by and any(r.cost_usd is None for r in rows):
        out.print("-: no input_per_mtok / output_per_mtok in the models file (not in the total)")


def add_parser(sub: Any) -> None:
    from chatjobs.cli import _duration

    parser = sub.add_parser("usage", help="a tenant's upstream calls, tokens and cost")
    parser.add_argument("--tenant", required=True)
    parser.add_argument(
        "--since",
        type=_duration,
        default=timedelta(days=7),
        help="how far back, e.g. 7d, 12h (at most 366d; default 7d)",
    )
    parser.add_argument(
        "--group-by", default="model,day", help="model, day, both (default) or '' for a total"
    )
    parser.set_defaults(func=run)
