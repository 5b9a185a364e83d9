"""Template variables in a schedule's job body, rendered from nominal times, never the clock.

A firing's body is its schedule's template with ``{{name}}`` replaced, in the strings of
message contents (``messages[*].content`` of the body or, for a job body, of its ``request``;
a string or parts at any depth) and in metadata
values (``metadata``, at any depth; keys are left alone). Everything else in the body is
copied as it is. Whitespace inside the braces is allowed (``{{ date }}``). Substitution is
exact-string replacement of these five names, nothing else (no expressions, no filters, no eval):

- ``scheduled_for``: the firing's nominal instant, ISO 8601 UTC (``2026-03-29T05:00:00Z``);
- ``window_start``: the cron's previous nominal instant before it (plan.window_start), so
  consecutive firings cover back-to-back windows even after downtime;
- ``window_end``: the same as ``scheduled_for``;
- ``date``, ``yesterday``: the nominal instant's date in the schedule's zone, and the day
  before (``YYYY-MM-DD``).

Any other ``{{identifier}}`` is an error naming it and where it is, both when a schedule is
created (check_template_variables) and when it fires. Text in double braces that is not an
identifier (``{{ a.b }}``) is left as it is. A value is at most 20 characters, so rendering
grows a body by at most half; the rendered text is still bounded by ``max_chars``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from chatjobs.schedules.cron import InvalidSchedule, check_timezone

VARIABLES = ("scheduled_for", "window_start", "window_end", "date", "yesterday")
MAX_RENDERED_CHARS = 10 * 1024 * 1024  # the API's request body limit (Settings.max_body_bytes)
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class InvalidTemplate(InvalidSchedule):
    """The template uses a variable that does not exist, or renders too large."""

    field = "template"


def template_variables(
    *, scheduled_for: datetime, window_start: datetime, timezone: str
) -> dict[str, str]:
    """The values of every variable for one firing, from its nominal instants."""
    local_day = scheduled_for.astimezone(check_timezone(timezone)).date()
    return {
        "scheduled_for": _iso_utc(scheduled_for),
        "window_start": _iso_utc(window_start),
        "window_end": _iso_utc(scheduled_for),
        "date": local_day.isoformat(),
        "yesterday": (local_day - timedelta(days=1)).isoformat(),
    }


def check_template_variables(body: Mapping[str, Any]) -> None:
    """Raise InvalidTemplate for the first unknown ``{{name}}`` where variables are rendered."""

    def check(where: str, text: str) -> str:
        _check(where, text)
        return text

    _walk(body, check)


def render_template(
    body: Mapping[str, Any], variables: Mapping[str, str], *, max_chars: int = MAX_RENDERED_CHARS
) -> dict[str, Any]:
    """A copy of ``body`` with the variables substituted; the input is not changed."""
    left = max_chars

    def render(where: str, text: str) -> str:
        nonlocal left
        _check(where, text)
        out = _PLACEHOLDER.sub(lambda match: variables[match.group(1)], text)
        left -= len(out)
        if left < 0:
            raise InvalidTemplate(f"template: renders to more than {max_chars} characters")
        return out

    return _walk(body, render)


_Visit = Callable[[str, str], str]


def _walk(body: Mapping[str, Any], visit: _Visit) -> dict[str, Any]:
    """A copy of ``body`` with ``visit(where, text)`` applied where variables are rendered."""
    out = dict(body)
    if isinstance(body.get("request"), dict):  # a job body: the request's messages
        out["request"] = _walk_messages(body["request"], "request.", visit)
    return _walk_messages(out, "", visit, metadata=True)


def _walk_messages(
    body: Mapping[str, Any], prefix: str, visit: _Visit, *, metadata: bool = False
) -> dict[str, Any]:
    out = dict(body)
    if isinstance(body.get("messages"), list):
        out["messages"] = [
            {
                **message,
                "content": _walk_value(message["content"], f"{prefix}messages[{i}].content", visit),
            }
            if isinstance(message, dict) and "content" in message
            else message
            for i, message in enumerate(body["messages"])
        ]
    if metadata and "metadata" in body:
        out["metadata"] = _walk_value(body["metadata"], "metadata", visit)
    return out


def _walk_value(value: Any, where: str, visit: _Visit) -> Any:
    if isinstance(value, str):
        return visit(where, value)
    if isinstance(value, dict):
        return {key: _walk_value(item, f"{where}.{key}", visit) for key, item in value.items()}
    if isinstance(value, list):
        return [_walk_value(item, f"{where}[{i}]", visit) for i, item in enumerate(value)]
    return value


def _check(where: str, text: str) -> None:
    for match in _PLACEHOLDER.finditer(text):
        if match.group(1) not in VARIABLES:
            raise InvalidTemplate(
                f"template: unknown variable {{{{{match.group(1)}}}}} in {where}"
                f" (known: {', '.join(VARIABLES)})"
            )


def _iso_utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"a naive datetime is ambiguous here: {moment.isoformat()}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
