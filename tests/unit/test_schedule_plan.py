"""A schedule's decisions over simulated time: catch-up after downtime, end_at and max_runs,
overlap with a 90 s job on a 60 s schedule, and each firing's window."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest

from chatjobs.schedules.plan import (
    Catchup,
    Due,
    Occupancy,
    OverlapAction,
    OverlapPolicy,
    decide_overlap,
    due_firings,
    release_buffered,
    window_start,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def times(*clock: str, day: str = "2026-05-04") -> tuple[datetime, ...]:
    return tuple(utc(f"{day}T{hh_mm}") for hh_mm in clock)


QUARTERS = "*/15 * * * *"


def after_downtime(catchup: Catchup | str, *, now: str = "10:00:05", **kwargs: Any) -> Due:
    """The ticker handled 08:00 and was down until ``now``: 2 h of quarter-hour firings."""
    return due_firings(
        expression=QUARTERS,
        timezone="UTC",
        cursor=utc("2026-05-04T08:00"),
        now=utc(f"2026-05-04T{now}"),
        catchup=catchup,
        **kwargs,
    )


# --- catch-up --------------------------------------------------------------------------------


def test_catchup_all_fires_every_time_within_the_window_and_misses_the_older_ones() -> None:
    due = after_downtime(Catchup.all)
    assert due.fire == times("09:15", "09:30", "09:45", "10:00")
    assert due.missed == times("08:15", "08:30", "08:45", "09:00")  # before 09:00:05
    assert due.cursor == utc("2026-05-04T10:00")
    assert (due.more, due.finished, due.next_fire_at) == (False, False, utc("2026-05-04T10:15"))


def test_catchup_latest_fires_only_the_most_recent_time() -> None:
    due = after_downtime(Catchup.latest)
    assert due.fire == times("10:00")
    assert due.missed == times("08:15", "08:30", "08:45", "09:00", "09:15", "09:30", "09:45")
    # Even when the most recent is minutes old, as long as it is within the window.
    late = after_downtime(Catchup.latest, now="10:07")
    assert late.fire == times("10:00") and len(late.missed) == 7


def test_catchup_none_fires_only_a_time_that_is_due_right_now() -> None:
    due = after_downtime(Catchup.none)
    assert due.fire == times("10:00")
    assert len(due.missed) == 7
    late = after_downtime(Catchup.none, now="10:07")
    assert late.fire == ()
    assert late.missed == times(
        "08:15", "08:30", "08:45", "09:00", "09:15", "09:30", "09:45", "10:00"
    )
    assert late.cursor == utc("2026-05-04T10:00")


@pytest.mark.parametrize("catchup", list(Catchup))
def test_every_mode_fires_on_time_when_the_ticker_was_not_down(catchup: Catchup) -> None:
    due = due_firings(
        expression=QUARTERS,
        timezone="UTC",
        cursor=utc("2026-05-04T09:45"),
        now=utc("2026-05-04T10:00:03"),
        catchup=catchup,
    )
    assert (due.fire, due.missed) == (times("10:00"), ())


def test_a_zero_window_still_fires_on_time_thanks_to_the_grace() -> None:
    due = after_downtime(Catchup.all, catchup_window=timedelta(0))
    assert due.fire == times("10:00") and len(due.missed) == 7
    late = after_downtime(Catchup.all, now="10:01:30", catchup_window=timedelta(0))
    assert late.fire == () and len(late.missed) == 8
    slow_ticker = after_downtime(
        Catchup.all, now="10:01:30", catchup_window=timedelta(0), grace=timedelta(minutes=2)
    )
    assert slow_ticker.fire == times("10:00")


def test_a_longer_window_fires_the_whole_downtime() -> None:
    due = after_downtime(Catchup.all, catchup_window=timedelta(hours=3))
    assert len(due.fire) == 8 and due.missed == ()


def test_nothing_is_due_before_the_next_time_and_the_cursor_stays() -> None:
    due = after_downtime(Catchup.all, now="08:14:59")
    assert (due.fire, due.missed, due.cursor) == ((), (), utc("2026-05-04T08:00"))
    assert due.next_fire_at == utc("2026-05-04T08:15")


def test_the_next_tick_goes_on_from_the_cursor_without_repeating_a_time() -> None:
    first = after_downtime(Catchup.all)
    second = due_firings(
        expression=QUARTERS, timezone="UTC", cursor=first.cursor, now=utc("2026-05-04T10:15:02")
    )
    assert second.fire == times("10:15") and second.missed == ()
    repeat = due_firings(
        expression=QUARTERS, timezone="UTC", cursor=second.cursor, now=utc("2026-05-04T10:15:09")
    )
    assert (repeat.fire, repeat.missed) == ((), ())


@pytest.mark.parametrize("catchup", list(Catchup))
def test_a_long_downtime_is_handled_a_hundred_times_a_call_with_nothing_lost(
    catchup: Catchup,
) -> None:
    every_minute: dict[str, Any] = dict(expression="* * * * *", timezone="UTC", catchup=catchup)
    now = utc("2026-05-04T10:00:10")
    whole = due_firings(cursor=utc("2026-05-04T08:00"), now=now, limit=1000, **every_minute)
    assert len(whole.fire) + len(whole.missed) == 120

    fired: list[datetime] = []
    missed: list[datetime] = []
    cursor, calls = utc("2026-05-04T08:00"), 0
    while True:
        due = due_firings(cursor=cursor, now=now, **every_minute)
        calls += 1
        assert len(due.fire) + len(due.missed) <= 100
        fired += due.fire
        missed += due.missed
        cursor = due.cursor
        if not due.more:
            break
    assert calls == 2
    assert (tuple(fired), tuple(missed)) == (whole.fire, whole.missed)


def test_a_new_schedule_never_fires_for_times_before_it_existed() -> None:
    created = utc("2026-05-04T10:07:30")
    due = due_firings(expression=QUARTERS, timezone="UTC", cursor=created, now=created)
    assert (due.fire, due.missed, due.next_fire_at) == ((), (), utc("2026-05-04T10:15"))


def test_start_at_is_inclusive_and_nothing_before_it_fires_or_is_missed() -> None:
    due = after_downtime(Catchup.all, start_at=utc("2026-05-04T09:30"))
    assert due.fire == times("09:30", "09:45", "10:00") and due.missed == ()
    waiting = after_downtime(Catchup.all, start_at=utc("2026-05-05T00:00"))
    assert (waiting.fire, waiting.missed) == ((), ())
    assert waiting.next_fire_at == utc("2026-05-05T00:00")


def test_end_at_is_inclusive_and_finishes_the_schedule() -> None:
    running = after_downtime(Catchup.all, end_at=utc("2026-05-04T12:00"))
    assert not running.finished and running.next_fire_at == utc("2026-05-04T10:15")
    ended = after_downtime(Catchup.all, end_at=utc("2026-05-04T09:45"))
    assert ended.fire == times("09:15", "09:30", "09:45")
    assert ended.finished and ended.next_fire_at is None
    assert ended.cursor == utc("2026-05-04T09:45")


def test_max_runs_counts_fired_times_and_stops_at_the_last_run() -> None:
    due = after_downtime(Catchup.all, max_runs=5, runs_so_far=3)
    assert due.fire == times("09:15", "09:30")
    assert due.missed == times("08:15", "08:30", "08:45", "09:00")  # missed do not count
    assert due.finished and due.next_fire_at is None
    assert due.cursor == utc("2026-05-04T09:30")  # 09:45 and 10:00 are neither fired nor missed


def test_a_schedule_whose_runs_are_used_up_does_nothing() -> None:
    due = after_downtime(Catchup.all, max_runs=3, runs_so_far=3)
    assert (due.fire, due.missed, due.finished) == ((), (), True)
    assert due.cursor == utc("2026-05-04T08:00")


def test_max_runs_not_yet_reached_leaves_the_schedule_running() -> None:
    due = after_downtime(Catchup.all, max_runs=10, runs_so_far=0)
    assert len(due.fire) == 4 and not due.finished


def test_a_fixed_time_in_the_spring_gap_is_due_once_as_the_gap_ends() -> None:
    """30 2 * * * in Berlin ticked every minute through 2026-03-29: one firing, at 01:00 UTC."""
    cursor, fired = utc("2026-03-28T22:00"), []
    now = cursor
    while now < utc("2026-03-29T04:00"):
        now += timedelta(minutes=1)
        due = due_firings(expression="30 2 * * *", timezone="Europe/Berlin", cursor=cursor, now=now)
        fired += [(fire, now) for fire in due.fire]
        assert due.missed == ()
        cursor = due.cursor
    assert fired == [(utc("2026-03-29T01:00"), utc("2026-03-29T01:00"))]


# --- window_start ----------------------------------------------------------------------------


def test_the_window_starts_at_the_previous_nominal_time_not_the_previous_run() -> None:
    # A daily 07:00 Berlin summary: the window before the first day of summer time is 23 h.
    assert window_start("0 7 * * *", "Europe/Berlin", utc("2026-03-29T05:00")) == utc(
        "2026-03-28T06:00"
    )
    # After downtime the windows still meet: each firing covers back to the one before.
    due = after_downtime(Catchup.all)
    windows = [(window_start(QUARTERS, "UTC", t), t) for t in due.fire]
    assert windows[0][0] == utc("2026-05-04T09:00")  # a missed time, not the last run (08:00)
    assert all(a[1] == b[0] for a, b in pairwise(windows))


# --- overlap ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "active", "buffered", "action", "after"),
    [
        (OverlapPolicy.skip, 0, 0, OverlapAction.start, Occupancy(1, 0)),
        (OverlapPolicy.skip, 1, 0, OverlapAction.skip, Occupancy(1, 0)),
        (OverlapPolicy.buffer_one, 1, 0, OverlapAction.buffer, Occupancy(1, 1)),
        (OverlapPolicy.buffer_one, 1, 1, OverlapAction.skip, Occupancy(1, 1)),
        (OverlapPolicy.buffer_all, 1, 3, OverlapAction.buffer, Occupancy(1, 4)),
        (OverlapPolicy.allow_all, 2, 0, OverlapAction.start, Occupancy(3, 0)),
        (OverlapPolicy.cancel_other, 2, 0, OverlapAction.cancel_and_start, Occupancy(1, 0)),
        (OverlapPolicy.cancel_other, 0, 0, OverlapAction.start, Occupancy(1, 0)),
    ],
)
def test_each_policy_decides_a_new_firing(
    policy: OverlapPolicy, active: int, buffered: int, action: OverlapAction, after: Occupancy
) -> None:
    assert decide_overlap(policy, Occupancy(active, buffered)) == (action, after)


def test_buffered_firings_start_one_at_a_time_when_nothing_is_active() -> None:
    assert release_buffered(Occupancy(active=1, buffered=2)) == (0, Occupancy(1, 2))
    assert release_buffered(Occupancy(active=0, buffered=2)) == (1, Occupancy(1, 1))
    assert release_buffered(Occupancy(active=0, buffered=0)) == (0, Occupancy(0, 0))


@dataclass
class Run:
    fired_at: int
    started_at: int
    ends_at: int
    cancelled: bool = False


@dataclass
class Simulation:
    """A 60 s schedule of 90 s jobs, decided second by second for ten minutes."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)  # buffered firings, oldest first

    def active(self, now: int) -> list[Run]:
        return [run for run in self.runs if run.started_at <= now < run.ends_at]

    def start(self, fired_at: int, now: int) -> None:
        self.runs.append(Run(fired_at, now, now + 90))

    def most_at_once(self) -> int:
        return max(len(self.active(now)) for now in range(600))


def simulate(policy: OverlapPolicy) -> Simulation:
    sim = Simulation()
    for now in range(600):  # a job ending at `now` is done before a firing at `now`
        occupancy = Occupancy(active=len(sim.active(now)), buffered=len(sim.waiting))
        released, occupancy = release_buffered(occupancy)
        for _ in range(released):
            sim.start(sim.waiting.pop(0), now)
        if now % 60:
            continue
        action, occupancy = decide_overlap(policy, occupancy)
        if action is OverlapAction.start:
            sim.start(now, now)
        elif action is OverlapAction.buffer:
            sim.waiting.append(now)
        elif action is OverlapAction.skip:
            sim.skipped.append(now)
        else:
            for run in sim.active(now):
                run.ends_at, run.cancelled = now, True
            sim.start(now, now)
        assert occupancy == Occupancy(len(sim.active(now)), len(sim.waiting))
    return sim


def started(sim: Simulation) -> list[tuple[int, int]]:
    return [(run.fired_at, run.started_at) for run in sim.runs]


def test_skip_drops_every_firing_that_finds_the_previous_job_running() -> None:
    sim = simulate(OverlapPolicy.skip)
    assert started(sim) == [(0, 0), (120, 120), (240, 240), (360, 360), (480, 480)]
    assert sim.skipped == [60, 180, 300, 420, 540]
    assert sim.most_at_once() == 1


def test_buffer_one_runs_the_first_waiting_firing_next_and_skips_the_rest() -> None:
    sim = simulate(OverlapPolicy.buffer_one)
    assert started(sim) == [
        (0, 0),
        (60, 90),
        (120, 180),
        (180, 270),
        (300, 360),
        (360, 450),
        (480, 540),
    ]
    assert sim.skipped == [240, 420]
    assert sim.waiting == [540]
    assert sim.most_at_once() == 1


def test_buffer_all_runs_every_firing_back_to_back_and_falls_behind() -> None:
    sim = simulate(OverlapPolicy.buffer_all)
    assert started(sim) == [(k * 60, k * 90) for k in range(7)]
    assert sim.skipped == [] and sim.waiting == [420, 480, 540]
    assert sim.most_at_once() == 1


def test_allow_all_starts_every_firing_on_time_side_by_side() -> None:
    sim = simulate(OverlapPolicy.allow_all)
    assert started(sim) == [(k * 60, k * 60) for k in range(10)]
    assert sim.skipped == [] and sim.most_at_once() == 2


def test_cancel_other_cancels_the_running_job_and_starts_the_new_one() -> None:
    sim = simulate(OverlapPolicy.cancel_other)
    assert started(sim) == [(k * 60, k * 60) for k in range(10)]
    assert [run.cancelled for run in sim.runs] == [True] * 9 + [False]
    assert sim.skipped == [] and sim.most_at_once() == 1


def test_policies_and_modes_may_be_given_as_their_stored_strings() -> None:
    assert decide_overlap("buffer_one", Occupancy(1, 0))[0] is OverlapAction.buffer
    due = after_downtime("latest")
    assert due.fire == times("10:00")
    with pytest.raises(ValueError):
        decide_overlap("sometimes", Occupancy())
