"""The FastAPI application."""

from __future__ import annotations

import threading

from fastapi import FastAPI

from api import docs, errors, methods, openapi, ui
from api.auth import Authenticate
from api.limits import BodySizeLimit
from api.request_id import RequestId
from api.routes import batches, files, health, jobs, keys, metrics, schedules, usage, webhooks
from chatjobs import longcontext
from chatjobs.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="chatjobs",
        version="0.1.0",
        description="Durable, asynchronous OpenAI-style chat-completion jobs.",
        docs_url=None,  # api/docs.py serves both pages, from no CDN
        redoc_url=None,
    )
    errors.install(app)
    openapi.install(app)
    methods.install(app)
    docs.install(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    app.include_router(keys.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(schedules.router)
    app.include_router(usage.router)
    ui.install(app)  # /ui, the web console (api/ui/__init__.py)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        large_bytes=settings.large_body_bytes,
        max_large=settings.max_large_bodies,
        wait_seconds=settings.large_body_wait_seconds,
    )
    app.add_middleware(Authenticate)  # outside BodySizeLimit: the key before the body
    app.add_middleware(RequestId)  # every response gets its id
    # Outermost: every /ui answer, a 413 of BodySizeLimit too, gets the console's CSP.
    app.add_middleware(ui.core.SecurityHeaders)
    # Loading the encodings takes ~1.5 s: done at start-up, not in the first request.
    threading.Thread(target=longcontext.warm, name="warm-encodings", daemon=True).start()
    return app
