"""Signing in and out of the console, the session cookie, and the form tokens (CSRF).

- Sign-in exchanges an API key for a session (chatjobs.ui_sessions): the key is posted once,
  never kept in the page, the URL or the cookie. The cookie holds a random token (only its
  hash is stored), is HttpOnly, SameSite=Strict, scoped to /ui, and Secure when the request
  came over HTTPS (``request.url.scheme``: uvicorn rewrites it from X-Forwarded-Proto for the
  proxies it trusts, FORWARDED_ALLOW_IPS, so nothing here trusts that header itself).
- Every state-changing form carries the session's token (``csrf``), compared in constant time;
  a missing or wrong one is a 403 and changes nothing. SameSite=Strict already keeps the
  cookie off cross-site requests: the token is the second lock, for browsers or proxies that
  do not honour it.
- The sign-in form has no session yet, so it is protected against login CSRF (an attacker
  signing the victim in with the attacker's key) by a double-submit token: a random
  ``cj_signin`` cookie (SameSite=Strict, HttpOnly) set with the form, which the posted field
  must match; another site can neither read the cookie nor make the browser send it. An
  Origin header, when sent, must also be ours.
"""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from api.ui.core import PREFIX, PageError, SignInRequired, page, read_form, see_other
from chatjobs import ui_sessions
from chatjobs.db import session_scope
from chatjobs.errors import AuthenticationFailed

router = APIRouter(prefix=PREFIX, include_in_schema=False)

COOKIE = "cj_session"
SIGNIN_COOKIE = "cj_signin"
HOME = f"{PREFIX}/jobs"


def safe_next(value: str | None) -> str:
    """Where to go after signing in: ``value`` if it is a path of the console, else the jobs
    page; never another site (``//evil``, ``/\\evil``, ``https://...``), never a control
    character."""
    if not value or any(ord(c) < 0x20 or c in "\\\x7f" for c in value):
        return HOME
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith("/"):
        return HOME
    if not (parts.path == PREFIX or parts.path.startswith(PREFIX + "/")):
        return HOME
    if parts.path.startswith(f"{PREFIX}/sign-"):
        return HOME
    return value


def _lookup(token: str) -> ui_sessions.Current:
    with session_scope() as session:
        return ui_sessions.current(session=session, token=token)


async def signed_in(request: Request) -> ui_sessions.Current:
    """The request's live session, or SignInRequired (a 303 to the sign-in page)."""
    token = request.cookies.get(COOKIE)
    if token:
        try:
            return await run_in_threadpool(_lookup, token)
        except AuthenticationFailed:
            pass
    if request.method == "GET":
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    else:  # a form posted once the session had ended: back to the page it was on
        here = _page_of(request.url.path)
    raise SignInRequired(here)


def _page_of(action: str) -> str:
    """The page an action's form sits on: ``/ui/jobs/{id}/cancel`` -> ``/ui/jobs/{id}``;
    the deliveries' ``/ui/jobs/{id}/deliveries/{d}/redeliver`` -> ``/ui/jobs/{id}``."""
    parts = action.rstrip("/").split("/")  # ["", "ui", area, id, ...]
    return "/".join(parts[:4]) if len(parts) > 4 else HOME


SessionDep = Annotated[ui_sessions.Current, Depends(signed_in)]


async def checked_form(request: Request, current: SessionDep) -> dict[str, str]:
    """The posted form of a signed-in user, once its ``csrf`` field is the session's; 403 if
    not."""
    form = await read_form(request)
    if not ui_sessions.same_token(form.get("csrf"), current.csrf_token):
        raise PageError(403, "This form has expired or did not come from this console.")
    return form


FormDep = Annotated[dict[str, str], Depends(checked_form)]


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _set_cookie(request: Request, response: Response, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def to_sign_in(request: Request, exc: Exception) -> Response:
    """The answer to SignInRequired: 303 to the sign-in page, dropping a dead cookie."""
    assert isinstance(exc, SignInRequired)
    response = see_other(f"{PREFIX}/sign-in?next={quote(safe_next(exc.next_path), safe='/')}")
    if COOKIE in request.cookies:
        response.delete_cookie(COOKIE, path=PREFIX)
    return response


def _sign_in_page(
    request: Request, next_path: str, *, status: int = 200, failed: bool = False
) -> HTMLResponse:
    token = request.cookies.get(SIGNIN_COOKIE) or ""
    if len(token) != 43:  # token_urlsafe(32); anything else is not one of ours
        token = secrets.token_urlsafe(32)
    response = page(
        request,
        "sign_in.html",
        {"next": next_path, "signin_token": token, "failed": failed},
        status=status,
    )
    _set_cookie(request, response, SIGNIN_COOKIE, token, 3600)
    return response


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_form(request: Request, next: str | None = None) -> HTMLResponse:
    """The sign-in form: an API key, exchanged for a session."""
    return _sign_in_page(request, safe_next(next))


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent (older browsers, some same-origin posts): the token decides
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def _open(key: str, replacing: str | None) -> ui_sessions.Opened:
    with session_scope() as session:
        return ui_sessions.open_session(session=session, key=key, replacing=replacing)


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request) -> Response:
    """Check the key; on success set the session cookie and go on to ``next``."""
    form = await read_form(request)
    next_path = safe_next(form.get("next"))
    cookie = request.cookies.get(SIGNIN_COOKIE)
    if cookie is None or not ui_sessions.same_token(form.get("csrf"), cookie):
        raise PageError(403, "This sign-in form has expired or did not come from this console.")
    if not _same_origin(request):
        raise PageError(403, "This sign-in form did not come from this console.")
    key = form.get("key", "").strip()
    try:
        if not key:
            raise AuthenticationFailed("no key")
        opened = await run_in_threadpool(_open, key, request.cookies.get(COOKIE))
    except AuthenticationFailed:
        return _sign_in_page(request, next_path, status=401, failed=True)
    response = see_other(next_path)
    _set_cookie(request, response, COOKIE, opened.token, int(ui_sessions.LIFETIME.total_seconds()))
    response.delete_cookie(SIGNIN_COOKIE, path=PREFIX)
    return response


def _close(token: str) -> None:
    with session_scope() as session:
        ui_sessions.close_session(session=session, token=token)


@router.post("/sign-out")
async def sign_out(request: Request, _: FormDep) -> Response:
    """End the session (its row is deleted) and drop the cookie."""
    await run_in_threadpool(_close, request.cookies[COOKIE])
    response = see_other(f"{PREFIX}/sign-in?flash=signed_out")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response
