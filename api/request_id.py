"""Every request gets an id, every response carries it as ``x-request-id``.

Pure ASGI and the outermost middleware, so responses made by other middleware (the 413 of
api.limits) and streamed ones carry the header too. The 500 that Starlette's
ServerErrorMiddleware sends comes from outside every middleware: api.errors reads the id
from the scope and sets the header on it itself.

It also refuses a URL whose path or query holds NUL (``%00``): no route can store or look
up such a string (Postgres text refuses NUL), whichever parameter it arrives in.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# A client's own id is kept when it is one a log line can quote safely.
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


def request_id(scope: Scope) -> str | None:
    """The id this middleware gave the request (None outside it)."""
    state: dict[str, Any] = scope.get("state") or {}
    rid = state.get("request_id")
    return rid if isinstance(rid, str) else None


class RequestId:
    """Give each HTTP request an id (the client's sane ``x-request-id``, else a new one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER, b"")
        raw = sent if _CLIENT_ID.fullmatch(sent) else f"req_{uuid.uuid4().hex}".encode()
        rid = raw.decode()
        # uvicorn gives each request its own copy of the state dict.
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, raw)]}
            await send(message)

        param = _nul_param(scope)
        if param is not None:
            await _refuse_nul(param, rid, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


def _nul_param(scope: Scope) -> str | None:
    """The name of the first query parameter (or "path") holding NUL, else None."""
    if "\x00" in scope.get("path", ""):
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" not in query and b"\x00" not in query:
        return None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in key or "\x00" in value:
            return key.replace("\x00", "\ufffd")
    return None


async def _refuse_nul(param: str, rid: str, send: Send) -> None:
    message = "must not contain NUL (%00)"
    body = json.dumps(
        {
            "error": {
                "type": "invalid_request_error",
                "message": f"{param}: {message}",
                "param": param,
                "details": [{"param": param, "rule": "nul_character", "message": message}],
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 422,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
