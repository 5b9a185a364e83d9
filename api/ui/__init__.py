"""The web console at /ui: server-rendered pages of a tenant's own data, signed in with an
API key (api/ui/session.py), working without JavaScript except for live status.

Layout, one module per area of the console:

- ``core.py``: templates, ``page()``, error pages, form reading, security headers;
- ``session.py``: sign-in, sign-out, the session cookie and form tokens (``SessionDep``,
  ``FormDep``);
- ``jobs.py``: the jobs list, a job's page, its actions and live status;
- ``batches.py``, ``schedules.py``, ``usage.py``: to come, each an ``APIRouter`` added to
  ``AREAS`` below and a folder of templates (the nav in ``templates/base.html`` links them).

Pages call the same chatjobs service functions as the /v1 routes, never the database
directly, and map their NotFound to the 404 page, so another tenant's id looks missing.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from api.ui import core, jobs, session

# Each area of the console: its router (prefix /ui). Add new pages' routers here.
AREAS: list[APIRouter] = [session.router, jobs.router]


def install(app: FastAPI) -> None:
    """Serve the console: its static files, its pages, its error pages and headers."""
    app.mount(f"{core.PREFIX}/static", StaticFiles(directory=core.STATIC), name="ui-static")
    for router in AREAS:
        app.include_router(router)
    app.add_exception_handler(core.SignInRequired, session.to_sign_in)
    app.add_exception_handler(core.PageError, core.error_page)
    app.add_middleware(core.SecurityHeaders)
