"""405 answers that name every method of the path, not only those of one route.

Starlette answers a known path with an unknown method from the first route whose path matches,
so ``OPTIONS /v1/jobs`` said ``Allow: POST`` although ``GET /v1/jobs`` exists too.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from api.errors import error_body


def _method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                allowed |= route.methods
    return JSONResponse(
        status_code=405,
        content=error_body("method_not_allowed", str(exc.detail)),
        headers={"Allow": ", ".join(sorted(allowed))},
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(405, _method_not_allowed)
