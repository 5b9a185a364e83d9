"""The beat process's own clock: the dispatcher and the reconciler run here, on threads.

They used to be Celery tasks that beat sent to the worker, and there they waited for a free
worker slot behind the jobs: with every slot busy on slow calls a tick waited past its expiry
and was discarded, so a saturated worker stopped republishing lost messages and waking due
retries exactly when it mattered. In the beat process they run on time whatever the workers
are doing. Several beats may run at once: every pass takes its rows with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from chatjobs.settings import get_settings
from worker import execute

log = logging.getLogger("chatjobs.clock")


def _every(interval: float, work: Callable[[], object], stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            work()
        except Exception:
            # Postgres or Redis away for a moment: the next tick tries again.
            log.warning("%s failed; retrying in %.1fs", work.__name__, interval, exc_info=True)


def start(stop: threading.Event | None = None) -> threading.Event:
    """Start the dispatcher and reconciler threads; set the returned event to stop them."""
    stop = stop or threading.Event()
    settings = get_settings()
    for name, interval, work in (
        ("dispatch", settings.dispatch_interval_seconds, execute.dispatch_due),
        ("reconcile", settings.reconcile_interval_seconds, execute.reconcile),
    ):
        threading.Thread(
            target=_every, args=(interval, work, stop), name=f"chatjobs-{name}", daemon=True
        ).start()
    return stop
