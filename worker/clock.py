"""The clocks that run beside Celery: the dispatcher loop (in beat and in every worker), the
reconciler and the schedule ticker (in beat).

They used to be Celery tasks that beat sent to the worker, and there they waited for a free
worker slot behind the jobs: with every slot busy on slow calls a tick waited past its expiry
and was discarded, so a saturated worker stopped republishing lost messages and waking due
retries exactly when it mattered. On threads of their own they run on time whatever the
workers are doing. Several may run at once: a dispatcher pass holds an advisory lock (the
others skip it), every reconciler and ticker pass takes its rows with SKIP LOCKED, and a
schedule's firing is unique per nominal instant.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from chatjobs import jobs
from chatjobs.jobs import dispatch
from chatjobs.offload import service as offload
from chatjobs.routing import offload_routes
from chatjobs.schedules import plan
from chatjobs.schedules import service as schedules
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


def dispatch_forever(stop: threading.Event, *, worker: str | None = None, slots: int = 0) -> None:
    """Admit jobs whenever something pokes, and at least every dispatch interval.

    A pass that filled the broker's room, or read all it asked of some tenant, goes again at
    once; otherwise the loop waits for a poke. A worker's loop also keeps its pool's slots
    registered, which sizes the broker's window.
    """
    interval = get_settings().dispatch_interval_seconds
    registered = delivered = last_pass = 0.0
    while not stop.is_set():
        # Every finished job pokes: passes at most every _PASS_GAP gather the pokes between
        # them, so a busy system admits several jobs a pass instead of one a pass per job.
        since = time.monotonic() - last_pass
        if since < _PASS_GAP and stop.wait(_PASS_GAP - since):
            break
        last_pass = time.monotonic()
        if worker is not None and time.monotonic() - registered > _REGISTER_EVERY:
            try:
                dispatch.register_slots(worker, slots, ttl=3 * _REGISTER_EVERY)
                registered = time.monotonic()
            except Exception:
                log.warning("could not register this worker's slots", exc_info=True)
        # Webhook deliveries fall due by the clock alone: once an interval, not on every poke.
        deliveries_due = time.monotonic() - delivered >= interval
        try:
            admitted = execute.dispatch_due(with_deliveries=deliveries_due)
            if deliveries_due:
                delivered = time.monotonic()
        except Exception:
            log.warning("dispatch failed; retrying in %.1fs", interval, exc_info=True)
            stop.wait(interval)
            continue
        if admitted.ids and (admitted.more or len(admitted.ids) >= admitted.room):
            continue
        dispatch.wait_for_poke(interval)


_REGISTER_EVERY = 10.0
# The shortest time between two passes of one dispatcher (and so the most a submission to an
# idle system can wait for a pass beyond its poke).
_PASS_GAP = 0.02


def start_dispatcher(
    stop: threading.Event | None = None, *, worker: str | None = None, slots: int = 0
) -> threading.Event:
    """Start a dispatcher loop on a thread; set the returned event to stop it."""
    stop = stop or threading.Event()
    threading.Thread(
        target=dispatch_forever,
        args=(stop,),
        kwargs={"worker": worker, "slots": slots},
        name="chatjobs-dispatch",
        daemon=True,
    ).start()
    return stop


def tick_schedules() -> int:
    """One schedule ticker pass; a firing is late by at most two ticks before it counts as
    due "now" rather than caught up."""
    settings = get_settings()
    grace = max(plan.DEFAULT_GRACE, timedelta(seconds=2 * settings.schedule_tick_seconds))
    return schedules.tick(grace=grace)


def offload_gather() -> int:
    """One offload pass: gather eligible jobs into upstream batches and submit them."""
    return offload.gather_pass(execute.retry_delay)


def offload_poll() -> int:
    """One offload poll pass: the submitted upstream batches that are due."""
    return offload.poll_pass(execute.retry_delay)


def start(stop: threading.Event | None = None) -> threading.Event:
    """Start beat's dispatcher, reconciler and schedule ticker threads, and the offload
    gatherer and poller when a route offloads; set the returned event to stop them."""
    stop = start_dispatcher(stop)
    settings = get_settings()
    loops: list[tuple[str, float, Callable[[], object]]] = [
        ("chatjobs-reconcile", settings.reconcile_interval_seconds, execute.reconcile),
        ("chatjobs-schedules", settings.schedule_tick_seconds, tick_schedules),
    ]
    if offload_routes():
        loops += [
            ("chatjobs-offload-gather", settings.offload_gather_seconds, offload_gather),
            ("chatjobs-offload-poll", min(settings.offload_poll_seconds, 5.0), offload_poll),
        ]
    for name, interval, work in loops:
        threading.Thread(target=_every, args=(interval, work, stop), name=name, daemon=True).start()
    jobs.poke()  # a pass at once: anything submitted while no dispatcher ran
    return stop
