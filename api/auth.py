"""Authentication before the body is read.

FastAPI reads and parses a request's body before it resolves the handler's dependencies, so
a tenant dependency alone answers 401 only after a 10 MiB body was parsed (~60 MB and 0.5 s).
This pure-ASGI step runs first for every /v1 route: it checks the Bearer key from the header
(the process's short cache, else one query in a thread), and for POST /v1/jobs the limits
that need no body (submissions per second, queued jobs). A refused request is answered
without a byte of its body read; uvicorn discards what the client still sends. An admitted
request carries its Caller in the scope, where ``api.deps.get_caller`` finds it.
"""

from __future__ import annotations

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.limits import limiter
from chatjobs.db import session_scope
from chatjobs.errors import AuthenticationFailed, ChatJobsError
from chatjobs.tenants import Caller, authenticate, cached_caller

CALLER = "chatjobs.caller"  # the scope key


def _lookup(key: str) -> Caller:
    with session_scope() as session:
        return authenticate(session=session, key=key)


async def resolve(authorization: str | None) -> Caller:
    """The caller an Authorization header names; AuthenticationFailed when it names none."""
    if not authorization:
        raise AuthenticationFailed("missing Authorization header; send 'Bearer <API key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed("Authorization header must be 'Bearer <API key>'")
    caller = cached_caller(key)
    if caller is None:
        caller = await run_in_threadpool(_lookup, key)
    return caller


def _needs_tenant(path: str) -> bool:
    # Everything under /v1 is a tenant's; /healthz, /readyz, /docs, /openapi.json are not.
    return path == "/v1" or path.startswith("/v1/")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class Authenticate:
    """Answer 401 (or a limit's 429) before the body is read; pass the Caller on in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _needs_tenant(scope["path"]):
            await self.app(scope, receive, send)
            return
        extra: list[tuple[bytes, bytes]] = []
        try:
            caller = await resolve(_header(scope, b"authorization"))
            if scope["method"] == "POST" and scope["path"] == "/v1/jobs":
                extra = await limiter().check_submit(caller)
        except (ChatJobsError, OperationalError) as exc:
            # The answers the handlers give: 401, 429, or 503 while Postgres is down.
            await error_response(Request(scope), exc)(scope, receive, send)
            return
        scope[CALLER] = caller
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)
