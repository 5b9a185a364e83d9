"""What a schedule's ticker does now: which nominal times fire, which are missed, and how a new
firing meets the jobs of earlier ones. Pure: ``now`` and the schedule's state are arguments.

Catch-up (due_firings)
----------------------
The ticker keeps a cursor per schedule: every nominal time at or before it has been handled
(fired, or recorded missed). A new schedule starts with its creation instant as the cursor, so
it never fires for times before it existed. Each tick looks at the nominal times t with
``cursor < t <= now`` (and ``start_at <= t <= end_at``), ascending, and decides each once:

- older than the catch-up window (``t < now - window``): **missed**, in every mode;
- within the window, by ``catchup``:
  ``all`` fires every one; ``latest`` fires only the most recent and records the earlier ones
  missed; ``none`` fires only the most recent and only if it is due right now
  (``t >= now - grace``), recording the others missed.

``grace`` (60 s by default; pass about twice the tick interval if that is longer) is how late a
healthy ticker may see a nominal time: ticks are periodic, a transaction can be slow, a ticker
can be replaced. The window is never shorter than the grace, so ``catchup_window=0`` with
``all`` still fires on time instead of calling every firing missed.

Both lists together hold at most ``limit`` times (100 by default); when more are due the
answer says ``more`` and its cursor is the last time handled, so the next call goes on from
there: nothing is lost or decided twice. The caller writes the firings and the new cursor in
one transaction; UNIQUE(schedule_id, scheduled_for) makes a repeated tick harmless anyway.

``max_runs`` counts firings that fired (the caller's ``runs_so_far``), not missed ones. When
the runs left are used up the answer stops at the last fire (``finished``); later nominal times
are neither fired nor missed. ``finished`` also says that no nominal time is left before
``end_at``. Otherwise ``next_fire_at`` is the next nominal time after the cursor, for the
ticker's index and the API's ``next_fire_times``.

Overlap (decide_overlap)
------------------------
A firing's job is *active* while it is queued, running or retrying. The policies follow
Temporal Schedules':

- ``skip`` (default): if an earlier firing is active (or buffered), record the new one skipped.
- ``buffer_one``: if active, buffer the new firing to start as soon as nothing is active; only
  one is buffered: while one waits, newer ones are skipped (the first one waiting is kept).
- ``buffer_all``: if active, buffer every new firing; buffered firings start one at a time, in
  order, each when the one before it is done.
- ``allow_all``: always start; jobs may run side by side.
- ``cancel_other``: if active, cancel the active jobs and start the new firing at once. (Temporal
  waits for the cancellation to finish before starting; chatjobs cancels a job in the same
  transaction as the new one is created, so there is nothing to wait for.)

Before deciding on new firings, a tick starts buffered ones (release_buffered): one when
nothing is active, oldest first, whatever the current policy (it may have been changed since).

window_start
------------
A firing's ``{{window_start}}`` is the cron's previous nominal time, not the previous actual
run, so after downtime or a skipped firing the windows still meet with no gap or overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from chatjobs.schedules import cron


class Catchup(StrEnum):
    none = "none"
    latest = "latest"
    all = "all"


class OverlapPolicy(StrEnum):
    skip = "skip"
    buffer_one = "buffer_one"
    buffer_all = "buffer_all"
    allow_all = "allow_all"
    cancel_other = "cancel_other"


class OverlapAction(StrEnum):
    start = "start"
    buffer = "buffer"
    skip = "skip"
    cancel_and_start = "cancel_and_start"


DEFAULT_CATCHUP = Catchup.all
DEFAULT_OVERLAP = OverlapPolicy.skip
DEFAULT_CATCHUP_WINDOW = timedelta(hours=1)
DEFAULT_GRACE = timedelta(seconds=60)
MAX_FIRINGS_PER_TICK = 100


@dataclass(frozen=True)
class Due:
    """One tick's decision over the nominal times in (cursor, now]."""

    fire: tuple[datetime, ...]  # fire these now, ascending
    missed: tuple[datetime, ...]  # record these as missed, ascending
    cursor: datetime  # every nominal time at or before it is handled: pass it next time
    more: bool  # stopped at the limit with more due: call again now
    finished: bool  # end_at passed or max_runs used up: the schedule will not fire again
    next_fire_at: datetime | None  # the next nominal time after cursor; None when finished


def due_firings(
    *,
    expression: str,
    timezone: str,
    cursor: datetime,
    now: datetime,
    catchup: Catchup | str = DEFAULT_CATCHUP,
    catchup_window: timedelta = DEFAULT_CATCHUP_WINDOW,
    grace: timedelta = DEFAULT_GRACE,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
    max_runs: int | None = None,
    runs_so_far: int = 0,
    limit: int = MAX_FIRINGS_PER_TICK,
) -> Due:
    """Which nominal times in (cursor, now] fire and which are missed (module docstring)."""
    mode = Catchup(catchup)  # a plain "all" from a row works too
    runs_left = None if max_runs is None else max_runs - runs_so_far
    after = cursor if start_at is None else max(cursor, start_at - timedelta(microseconds=1))
    upto = now if end_at is None else min(now, end_at)
    window_from = now - max(catchup_window, grace)
    only = None  # with latest or none, the one time that may fire
    if mode is not Catchup.all:
        only = _last_fire_in(expression, timezone, after, upto)
        if only is not None and only < (window_from if mode is Catchup.latest else now - grace):
            only = None

    fire: list[datetime] = []
    missed: list[datetime] = []
    more = False
    upcoming = None  # the first nominal time left undecided
    for nominal in cron.fires_after(expression, timezone, after):
        if nominal > upto or (runs_left is not None and len(fire) >= runs_left):
            upcoming = nominal
            break
        if len(fire) + len(missed) >= limit:
            upcoming, more = nominal, True
            break
        in_window = nominal >= window_from if mode is Catchup.all else nominal == only
        (fire if in_window else missed).append(nominal)
        cursor = nominal

    finished = (
        (runs_left is not None and len(fire) >= runs_left)
        or upcoming is None
        or (end_at is not None and upcoming > end_at)
    )
    return Due(
        fire=tuple(fire),
        missed=tuple(missed),
        cursor=cursor,
        more=more,
        finished=finished,
        next_fire_at=None if finished else upcoming,
    )


def _last_fire_in(
    expression: str, timezone: str, after: datetime, upto: datetime
) -> datetime | None:
    """The latest nominal time t with ``after < t <= upto``, if any."""
    last = cron.previous_fire(expression, timezone, upto + timedelta(microseconds=1))
    return last if last > after else None


def window_start(expression: str, timezone: str, scheduled_for: datetime) -> datetime:
    """A firing's ``{{window_start}}``: the cron's nominal time before ``scheduled_for``."""
    return cron.previous_fire(expression, timezone, scheduled_for)


@dataclass(frozen=True)
class Occupancy:
    """The earlier firings of one schedule that a new firing may overlap."""

    active: int = 0  # firings whose job is queued, running or retrying
    buffered: int = 0  # firings waiting for those to finish before their job is created


def release_buffered(occupancy: Occupancy) -> tuple[int, Occupancy]:
    """How many buffered firings to start now (oldest first), and the occupancy after."""
    if occupancy.active or not occupancy.buffered:
        return 0, occupancy
    return 1, Occupancy(active=1, buffered=occupancy.buffered - 1)


def decide_overlap(
    policy: OverlapPolicy | str, occupancy: Occupancy
) -> tuple[OverlapAction, Occupancy]:
    """What to do with a new firing under ``policy``, and the occupancy after doing it.

    Call release_buffered first; with several new firings in one tick, decide them in order,
    each with the occupancy the one before returned.
    """
    policy = OverlapPolicy(policy)  # a plain "skip" from a row works too
    if (not occupancy.active and not occupancy.buffered) or policy is OverlapPolicy.allow_all:
        return OverlapAction.start, Occupancy(occupancy.active + 1, occupancy.buffered)
    if policy is OverlapPolicy.cancel_other:
        return OverlapAction.cancel_and_start, Occupancy(active=1, buffered=occupancy.buffered)
    if policy is OverlapPolicy.buffer_all or (
        policy is OverlapPolicy.buffer_one and not occupancy.buffered
    ):
        return OverlapAction.buffer, Occupancy(occupancy.active, occupancy.buffered + 1)
    return OverlapAction.skip, occupancy
