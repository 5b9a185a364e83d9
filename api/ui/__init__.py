"""The web console at /ui: server-rendered pages of a tenant's own data, signed in with an
API key (api/ui/session.py), working without JavaScript except for live status.

Layout, one module per area of the console:

- ``core.py``: templates, ``page()``, error pages (``PageError``, ``not_found()``), form
  reading, flash messages (``FLASH``), security headers;
- ``session.py``: sign-in, sign-out, the session cookie and form tokens (``SessionDep``,
  ``FormDep``);
- ``jobs.py``: the jobs list, a job's page, its actions and live status;
- ``batches.py``: the batches list, a batch's page, its actions, file downloads and live
  progress (JSON polled by console.js);
- ``schedules.py``: the schedules list, a schedule's page and its actions;
- ``usage.py``: usage per day and model, charted (``charts.py``) and tabled.

Adding a page (``jobs.py`` is the example to copy):

1. A module here with ``router = APIRouter(prefix=PREFIX, include_in_schema=False)`` and its
   handlers: a read takes ``current: SessionDep`` (anonymous visitors are sent to sign in);
   an action is a POST that also takes ``_: FormDep`` (the form token is checked for you)
   and answers ``see_other(url + "?flash=<code>")``.
2. The data through the same chatjobs service function the /v1 route calls, with
   ``current.caller.tenant_id``, in one ``session_scope()`` inside ``run_in_threadpool``;
   catch ``NotFound`` and ``raise not_found()`` (another tenant's id looks missing).
3. A template in ``templates/<area>/`` extending ``base.html``; render it with
   ``page(request, name, context, csrf=current.csrf_token)``. Autoescape is on: never
   ``|safe`` on data, no inline script or style (the CSP refuses them); put any new flash
   text in ``core.FLASH``.
4. Add the router to ``AREAS`` below; ``api/app.py`` needs nothing more.
5. Route tests in ``tests/integration/test_ui_<area>.py`` (``ui_helpers.sign_in``): the page
   for its owner, the 404 page for another tenant, every action's 403 without its token, and
   escaping of whatever text the tenant controls; then the README's Console section.

Pages call the same chatjobs service functions as the /v1 routes, never the database
directly.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from api.ui import batches, core, jobs, schedules, session, usage

# Each area of the console: its router (prefix /ui). Add new pages' routers here.
AREAS: list[APIRouter] = [
    session.router,
    jobs.router,
    batches.router,
    schedules.router,
    usage.router,
]


def install(app: FastAPI) -> None:
    """Serve the console: its static files, its pages, its error pages and headers."""
    app.mount(f"{core.PREFIX}/static", StaticFiles(directory=core.STATIC), name="ui-static")
    for router in AREAS:
        app.include_router(router)
    app.add_exception_handler(core.SignInRequired, session.to_sign_in)
    app.add_exception_handler(core.PageError, core.error_page)
    _page_for_unknown_paths(app)
    # core.SecurityHeaders is added by api/app.py, outermost, so that answers made by the
    # other middleware (a 413 of api/limits.py) carry the headers too.


_ROUTING_ERRORS = {
    405: "That address is a form's action: use the button on its page.",
}


def _page_for_unknown_paths(app: FastAPI) -> None:
    # Under /ui an HTTP error the routing raises (no such page, a GET of an action's address)
    # is a console page; everywhere else it stays with the handler installed before
    # (api/errors.py's JSON, api/methods.py's 405).
    for key in (HTTPException, 405):
        before = app.exception_handlers.get(key)
        assert before is not None, "install api.errors and api.methods before the console"
        app.add_exception_handler(key, _console_first(before))


def _console_first(before: Any) -> Any:
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if path == core.PREFIX or path.startswith(core.PREFIX + "/"):
            if exc.status_code == 404:
                return core.error_page(request, core.not_found())
            message = _ROUTING_ERRORS.get(exc.status_code, "The console could not do that.")
            return core.error_page(request, core.PageError(exc.status_code, message))
        answer = before(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    return http_error
