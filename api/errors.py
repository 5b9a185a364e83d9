"""The one place that maps chatjobs errors to HTTP statuses and the error envelope.

The envelope is OpenAI's, so its SDKs raise their typed errors with every field set:
``{"error": {"message", "type", "param", "code"}}`` (``param`` and ``code`` null when none),
plus ``details`` and ``request_id`` where they apply. A 4xx other than 408 and 429 carries
``x-should-retry: false``: the SDKs resend a 409 (and any 5xx) unless told not to, and a
refused request, an Idempotency-Key conflict above all, would only be refused again.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.request_id import request_id
from chatjobs.errors import (
    AuthenticationFailed,
    ChatJobsError,
    ConfigurationError,
    Conflict,
    ContextTooLong,
    FileTooLarge,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    TooManyUpstreamCalls,
)
from chatjobs.schedules.cron import InvalidSchedule
from chatjobs.storable import clean_text

log = logging.getLogger("chatjobs.api")

_STATUS: list[tuple[type[ChatJobsError], int, str]] = [
    (FileTooLarge, 413, "request_too_large"),
    (InvalidRequest, 400, "invalid_request_error"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (AuthenticationFailed, 401, "authentication_error"),
    (LimitExceeded, 429, "rate_limit_exceeded"),
    (TooManyUpstreamCalls, 422, "too_many_upstream_calls"),
    (ContextTooLong, 422, "context_length_exceeded"),
    (InvalidSchedule, 422, "invalid_request_error"),
]


def error_body(
    type_: str, message: str, *, param: str | None = None, code: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def no_retry(status: int) -> bool:
    """Whether an answer with this status tells clients not to resend the request."""
    return 400 <= status < 500 and status not in (408, 429)


def error_json(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error answer: the envelope, with ``x-should-retry: false`` where it applies."""
    headers = dict(headers or {})
    if no_retry(status):
        headers["x-should-retry"] = "false"
    return JSONResponse(status_code=status, content=body, headers=headers)


def _internal(request: Request, type_: str, message: str) -> JSONResponse:
    """A 500 in the envelope, with the request's id in the body and the header (this response
    may be sent from outside the middleware that sets the header)."""
    rid = request_id(request.scope) or f"req_{uuid.uuid4().hex}"
    return error_json(500, error_body(type_, message, request_id=rid), {"x-request-id": rid})


def _param(loc: tuple[int | str, ...]) -> str:
    if loc[:1] == ("body",) and all(isinstance(p, int) for p in loc[1:]):
        return "body"  # the body itself, e.g. JSON that does not parse
    # A key may hold what the client should not have sent (NUL, a lone surrogate).
    parts = [clean_text(str(p)) for p in loc if p not in ("body",)]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = []
    for err in exc.errors():
        message = clean_text(str(err.get("msg", "invalid")).removeprefix("Value error, "))
        details.append(
            {
                "param": _param(tuple(err.get("loc", ()))),
                "rule": err.get("type"),
                "message": message,
            }
        )
    summary = "; ".join(f"{d['param'] or 'body'}: {d['message']}" for d in details)
    return error_json(
        422,
        error_body(
            "invalid_request_error",
            summary,
            param=details[0]["param"] if details else None,
            details=details,
        ),
    )


def _chatjobs_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ConfigurationError):
        # The operator's mistake, not the client's: the details (file paths, parse errors)
        # go to the log, the client learns only that the service is misconfigured.
        log.error("configuration error request_id=%s: %s", request_id(request.scope), exc)
        return _internal(
            request,
            "configuration_error",
            "the service is misconfigured; its operator must fix it (see the API log)",
        )
    for cls, status, type_ in _STATUS:
        if isinstance(exc, cls):
            headers = {"www-authenticate": "Bearer"} if status == 401 else None
            if isinstance(exc, LimitExceeded):
                headers = _limit_headers(exc)
            param = exc.param if isinstance(exc, InvalidRequest) else None
            if isinstance(exc, InvalidSchedule):
                param = exc.field  # cron, timezone or template
            return error_json(status, error_body(type_, str(exc), param=param), headers)
    return _unexpected(request, exc)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware calls this for any exception nothing else handled,
    # even once a response has started (it then sends nothing); the traceback is logged
    # under the id the client sees.
    response = _internal(
        request, "internal_error", "internal error; quote the request_id when reporting it"
    )
    log.error(
        "unexpected %s request_id=%s %s %s",
        type(exc).__name__,
        response.headers["x-request-id"],
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return response


def _limit_headers(exc: LimitExceeded) -> dict[str, str]:
    # Retry-After in whole seconds (HTTP), retry-after-ms for clients that read it (OpenAI's).
    wait = max(0.0, exc.retry_after)
    return {
        "retry-after": str(math.ceil(wait)),
        "retry-after-ms": str(math.ceil(wait * 1000)),
        **exc.headers,
    }


def error_response(request: Request, exc: ChatJobsError | OperationalError) -> JSONResponse:
    """The handlers' answer to ``exc``, for ASGI steps that run before them (api/auth.py)."""
    if isinstance(exc, OperationalError):
        return _database_error(request, exc)
    return _chatjobs_error(request, exc)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_json(
        exc.status_code, error_body(type_, str(exc.detail)), getattr(exc, "headers", None)
    )


def _database_error(_: Request, exc: Exception) -> JSONResponse:
    # Postgres unreachable or restarting: a transient condition the client can retry.
    return error_json(
        503,
        error_body("service_unavailable", "the database is unavailable; retry shortly"),
        {"retry-after": "1"},
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ChatJobsError, _chatjobs_error)
    app.add_exception_handler(Exception, _unexpected)
