"""/docs and /redoc that work without internet: their JavaScript and CSS come from a package.

FastAPI's own pages load Swagger UI and ReDoc from cdn.jsdelivr.net, Google's fonts and a
favicon from fastapi.tiangolo.com; on a host without internet they stay blank. The same
pages are served here with every asset under ASSETS, from the files of ``fastapi-offline``
(MIT): its wheel ships only them and a 3 KB factory we do not use. Its 1.7.7 carries Swagger
UI 5.32.6 and ReDoc 2.5.3, both of which read the OpenAPI 3.1 document FastAPI generates.
``swagger-ui-bundle``, the other package on PyPI, stops at Swagger UI 4.15, which refuses
a 3.1 document, and has no ReDoc.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

ASSETS = "/docs-assets"
SWAGGER_JS = f"{ASSETS}/swagger-ui-bundle.js"
SWAGGER_CSS = f"{ASSETS}/swagger-ui.css"
REDOC_JS = f"{ASSETS}/redoc.standalone.js"
FAVICON = f"{ASSETS}/favicon.png"
# Both pages may load only from this origin, so the browser refuses what the bundles still
# fetch from elsewhere (ReDoc 2.5's sidebar logo, from cdn.redoc.ly) before it leaves the
# host. It says where from, not what: the bundles need inline styles, eval and blob: workers.
CONTENT_SECURITY_POLICY = "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"


def install(app: FastAPI) -> None:
    """Serve the assets and both pages as FastAPI would (for an app built with
    ``docs_url=None, redoc_url=None``), outside the OpenAPI document and without a key."""
    assert app.openapi_url, "the pages render the app's OpenAPI document"
    openapi_url = app.openapi_url
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url
    app.mount(ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=root + SWAGGER_JS,
            swagger_css_url=root + SWAGGER_CSS,
            swagger_favicon_url=root + FAVICON,
            oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        return _from_here(page)

    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=root + REDOC_JS,
            redoc_favicon_url=root + FAVICON,
            with_google_fonts=False,
        )
        return _from_here(page)

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    if oauth2_redirect_url:
        app.add_route(oauth2_redirect_url, oauth2_redirect, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)


def _from_here(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def _root(request: Request) -> str:
    # Behind a proxy that strips a prefix, the page's URLs carry it back (as FastAPI's do).
    return str(request.scope.get("root_path", "")).rstrip("/")
