"""What every console page shares: the templates, the page answer, the error pages, the form
reader and the security headers.

Templates are autoescaped (every ``.html``), so a job's text renders as text; nothing that
came from a user is ever marked ``|safe``. No page has inline script or style: the CSP below
forbids both, and ``static/console.js`` is the only script.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HERE = Path(__file__).parent
STATIC = HERE / "static"
PREFIX = "/ui"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]

# The only messages a redirect can ask a page to show (``?flash=<code>``): a code, never text,
# so nothing a link carries is ever reflected. Pages of other areas add their codes here.
FLASH = {
    "cancelled": "The job was cancelled.",
    "not_cancellable": "The job had already finished: nothing was cancelled.",
    "redelivering": "The delivery will be sent again shortly, under the same webhook-id.",
    "delivery_in_progress": "An attempt of that delivery is in flight; redeliver it once it ends.",
    "url_disabled": "That delivery's URL is disabled (it answered 410); enable it first.",
    "signed_out": "You are signed out.",
    # batches
    "batch_cancelled": "The batch is cancelled: its unfinished lines end as cancelled, and "
    "those that had finished keep their output.",
    "batch_not_cancellable": "The batch had already ended: nothing was cancelled.",
    "batch_retried": "A new batch of the failed lines was created: this is it.",
    "batch_retry_exists": "That batch was already retried from the console: this is the retry.",
    "batch_not_retryable": "Only a completed, expired or cancelled batch can be retried.",
    "batch_nothing_to_retry": "The batch has no failed lines to retry.",
    "batch_retry_key_taken": "Not retried: the console's retry key for this batch was used by "
    "another request through the API.",
    # schedules
    "paused": "The schedule is paused: it fires nothing until resumed.",
    "already_paused": "The schedule was already paused: nothing changed.",
    "resumed": "Resumed: it fires from now on (times passed while paused are not fired).",
    "not_paused": "The schedule was not paused: nothing changed.",
    "note_invalid": "That note was refused (over 1000 characters, or a NUL): nothing changed.",
    "schedule_refused": "The schedule's stored settings no longer validate: nothing changed.",
    "triggered": "Fired now.",
    "trigger_buffered": "Buffered: it starts when the running firing ends (overlap policy).",
    "trigger_skipped": "Skipped: a firing is still running (overlap policy).",
    "trigger_failed": "The firing failed: its template could not be submitted.",
}


def when(value: datetime | None) -> str:
    """A timestamp as the pages show it: UTC, to the second."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"], default_for_string=True, default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters["when"] = when
# A message's text longer than this is cut on the server: the page carries its start and its
# length, and names the API request with the whole (a long document sent for map-reduce would
# otherwise be the whole page; api/ui/jobs.py Text, partials/conversation.html).
LONG_TEXT = 2000


def page(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
    csrf: str | None = None,
) -> HTMLResponse:
    """A rendered page; ``csrf`` is the session's form token, for the forms on it (the nav's
    sign-out among them: a page without it shows no nav)."""
    flash = FLASH.get(request.query_params.get("flash", ""))
    html = env.get_template(template).render(
        {"request": request, "csrf": csrf, "flash": flash, "path": request.url.path}
        | (context or {})
    )
    return HTMLResponse(html, status_code=status)


def see_other(url: str) -> RedirectResponse:
    """The answer to a form: go (GET) to ``url``, a path of ours."""
    return RedirectResponse(url, status_code=303)


# --- errors ----------------------------------------------------------------------------


class SignInRequired(Exception):
    """No live session: the browser goes to the sign-in page, and comes back to ``next``."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass
class PageError(Exception):
    """A page that cannot be shown: 404 (missing, or another tenant's), 403 (a form without
    its token) and the like; ``message`` is fixed text, never the request's."""

    status: int
    message: str


def not_found() -> PageError:
    # The same page for a missing object and another tenant's, as the API's 404.
    return PageError(404, "Nothing here: no such page, or nothing of yours by that id.")


def error_page(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, PageError)
    return page(
        request, "error.html", {"status": exc.status, "message": exc.message}, status=exc.status
    )


# --- forms -----------------------------------------------------------------------------

_MAX_FIELDS = 32


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first of a repeated one); empty for any other body.

    Forms here are a few short fields, and api/limits.py has already capped the body (64 KiB
    outside /v1), so no multipart parser is needed (nor installed).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    try:
        pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except ValueError:  # more fields than any form of ours has
        return {}
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


# --- headers ---------------------------------------------------------------------------


class SecurityHeaders:
    """Every /ui answer gets the CSP and framing headers; pages (not static files) are never
    cached, since they show a tenant's data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        extra = list(HEADERS)
        if not path.startswith(PREFIX + "/static/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in extra}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
