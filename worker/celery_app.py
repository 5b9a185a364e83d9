"""The worker's Celery app: the shared configuration plus tasks and the beat schedule."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from celery.schedules import crontab
from celery.signals import (
    beat_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
)
from sqlalchemy import text

from chatjobs import logs, longcontext
from chatjobs.db import reset_engine, session_scope
from chatjobs.queue import make_celery
from worker.runtime import get_runtime, set_pool_slots

app = make_celery()
app.conf.include = ["worker.tasks"]
# Beat drives the daily retention task and, on threads of its own, the dispatcher and
# reconciler; an in-memory schedule avoids a schedule file two beats on one host would fight
# over.
app.conf.beat_scheduler = "celery.beat:Scheduler"
app.conf.beat_schedule = {
    # Retention, daily at a quiet hour (UTC); `chatjobs prune` does the same by hand.
    "prune": {
        "task": "chatjobs.prune",
        "schedule": crontab(hour=3, minute=17),
        "options": {"expires": 3600},
    },
}


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: Any) -> None:
    # A receiver here replaces Celery's own setup: its lines come out in CHATJOBS_LOG_FORMAT.
    logs.configure(loglevel or "INFO")


@beat_init.connect
def _start_clock(**_: Any) -> None:
    # The dispatcher and reconciler tick inside the beat process (worker/clock.py says why).
    from worker import clock

    clock.start()


_worker_slots = 0
_threaded = False


@worker_init.connect
def _size_for_pool(sender: Any = None, **_: Any) -> None:
    # The pool's real size, whether it came from settings, --concurrency or the plain
    # `celery -A worker worker` command line.
    global _worker_slots, _threaded
    concurrency = int(getattr(sender, "concurrency", 0) or 0)
    _threaded = "thread" in str(getattr(sender, "pool_cls", "")).lower()
    set_pool_slots(concurrency if _threaded else 1)
    _worker_slots = max(1, concurrency)


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool process must not share the parent's database sockets.
    reset_engine(after_fork=True)


def _warm_up(threaded: bool) -> None:
    # Planning and limiter reservations count tokens: load the encoding before the first job.
    longcontext.warm()
    if threaded:
        # The loop, the upstream clients and a database connection, made now rather than by
        # the first job (measured: its claim 126 ms after its message was taken, 2 ms after).
        get_runtime()
        with session_scope() as session:
            session.execute(text("SELECT 1"))


@worker_ready.connect
def _warm(sender: Any = None, **_: Any) -> None:
    threading.Thread(target=_warm_up, args=(_threaded,), name="warm-up", daemon=True).start()
    # Every worker runs a dispatcher too (one passes at a time), so none is a single point
    # of failure; its loop registers this worker's slots, which size the broker's window.
    from worker import clock

    name = getattr(sender, "hostname", None) or f"{socket.gethostname()}:{os.getpid()}"
    clock.start_dispatcher(worker=f"{name}:{os.getpid()}", slots=_worker_slots)
