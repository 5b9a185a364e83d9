"""The schedule engine on real Postgres with an injected clock (chatjobs.schedules.service):
firings exactly once, template variables from nominal times, overlap, catch-up, DST, end_at
and max_runs, triggers, backfills and batch templates.

Each test runs on a queue of its own (the ``queue`` fixture) and calls ``tick(now=...)``
itself, as beat's ticker would; no worker runs, so a job's end is written by the test.
Three real beat processes over real minutes are in test_schedule_tickers.py.

DST transitions tested through the ticker (ticked every minute from 100 minutes before the
offset change to 100 after; fire instants in UTC):

==========================  ==========  ==============================  ====================
zone, date                  change      fixed time                      ``0 * * * *``
==========================  ==========  ==============================  ====================
Europe/Berlin 2026-03-29    01:00 UTC   30 2 -> 01:00 (03:00 CEST)      00:00, 01:00, 02:00
Europe/Berlin 2026-10-25    01:00 UTC   30 2 -> 00:30 (02:30 CEST) only 00:00, 01:00, 02:00
Europe/Berlin 2027-03-28    01:00 UTC   30 2 -> 01:00 (03:00 CEST)      00:00, 01:00, 02:00
Europe/Berlin 2027-10-31    01:00 UTC   30 2 -> 00:30 (02:30 CEST) only 00:00, 01:00, 02:00
America/New_York 2026-03-08 07:00 UTC   30 2 -> 07:00 (03:00 EDT)       06:00, 07:00, 08:00
America/New_York 2026-11-01 06:00 UTC   30 1 -> 05:30 (01:30 EDT) only; 05:00, 06:00, 07:00
                                        30 2 -> 07:30 (02:30 EST)
America/New_York 2027-03-14 07:00 UTC   30 2 -> 07:00 (03:00 EDT)       06:00, 07:00, 08:00
America/New_York 2027-11-07 06:00 UTC   30 1 -> 05:30 (01:30 EDT) only; 05:00, 06:00, 07:00
                                        30 2 -> 07:30 (02:30 EST)
==========================  ==========  ==============================  ====================

A wall time in the spring gap fires once, at the gap's end; a repeated wall time fires once,
on its first pass; hourly keeps one firing per real hour through both. Each fires on the
first tick at or after its instant, and ``next_fire_times`` shows the shift beforehand.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from chatjobs import files
from chatjobs.batches import service as batches
from chatjobs.db import session_scope
from chatjobs.errors import InvalidRequest
from chatjobs.jobs.dispatch import PRIORITY_BACKFILL
from chatjobs.models import Batch, Job, JobStatus, Schedule, ScheduleFiring, WebhookDelivery
from chatjobs.schedules import service
from chatjobs.schedules.plan import OverlapPolicy
from tests.integration import test_batch_core as batch_core
from tests.unit.test_schedule_plan import simulate, started

pytestmark = pytest.mark.integration

T0 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
SUMMARY = {
    "request": {
        "model": "gpt-4.1",
        "messages": [
            {"role": "user", "content": "Summarise tickets from {{window_start}} to {{window_end}}"}
        ],
    },
    "metadata": {"day": "{{date}}", "previous": "{{yesterday}}"},
}


def create(tenant: uuid.UUID, now: datetime = T0, **spec: Any) -> str:
    spec.setdefault("cron", "* * * * *")
    spec.setdefault("template", SUMMARY)
    with session_scope() as session:
        schedule = service.create_schedule(
            session, tenant_id=tenant, spec=service.Spec(**spec), now=now
        )
        return schedule.id


def firings(schedule_id: str) -> list[tuple[datetime, str, str]]:
    """(scheduled_for, reason, status) of every firing, in nominal order."""
    with session_scope() as session:
        rows = session.execute(
            select(ScheduleFiring.scheduled_for, ScheduleFiring.reason, ScheduleFiring.status)
            .where(ScheduleFiring.schedule_id == schedule_id)
            .order_by(ScheduleFiring.scheduled_for)
        ).all()
    return [(row[0].astimezone(UTC), row[1], row[2]) for row in rows]


def jobs_of(schedule_id: str) -> list[Job]:
    with session_scope() as session:
        rows = session.scalars(
            select(Job).where(Job.schedule_id == schedule_id).order_by(Job.scheduled_for)
        ).all()
        session.expunge_all()
        return list(rows)


def nominal(job: Job) -> datetime:
    assert job.scheduled_for is not None
    return job.scheduled_for


def finish(job_ids: list[uuid.UUID], status: JobStatus = JobStatus.succeeded) -> None:
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(status=status, completed_at=datetime.now(UTC), next_attempt_at=None)
        )


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def test_a_due_firing_makes_one_job_with_variables_from_nominal_times(tenant: uuid.UUID) -> None:
    schedule_id = create(tenant, cron="0 7 * * *", timezone="Europe/Berlin")
    with session_scope() as session:
        schedule = session.get(Schedule, schedule_id)
        assert schedule is not None
        nominal = datetime(2026, 6, 2, 5, 0, tzinfo=UTC)  # 07:00 CEST
        assert schedule.next_fire_at == nominal
        assert service.next_fire_times(schedule)[:2] == [nominal, nominal + timedelta(days=1)]
    assert service.tick(now=nominal - timedelta(seconds=1)) == 0
    # The ticker runs 20 s late: the variables still name the nominal instants.
    assert service.tick(now=nominal + timedelta(seconds=20)) == 1
    (job,) = jobs_of(schedule_id)
    assert job.scheduled_for == nominal and job.status == JobStatus.queued
    assert job.request["messages"][0]["content"] == (
        "Summarise tickets from 2026-06-01T05:00:00Z to 2026-06-02T05:00:00Z"
    )
    assert job.metadata_ == {"day": "2026-06-02", "previous": "2026-06-01"}
    assert firings(schedule_id) == [(nominal, "cadence", "fired")]


def test_three_tickers_at_once_fire_each_instant_once(tenant: uuid.UUID) -> None:
    schedule_id = create(tenant, overlap_policy="allow_all")
    for step in range(1, 6):
        now = T0 + minutes(step) + timedelta(seconds=1)
        with ThreadPoolExecutor(3) as pool:
            for ticker in [pool.submit(service.tick, now=now) for _ in range(3)]:
                ticker.result()
    nominal = [T0 + minutes(step) for step in range(1, 6)]
    assert [f[0] for f in firings(schedule_id)] == nominal
    assert [job.scheduled_for for job in jobs_of(schedule_id)] == nominal


# --- overlap: a 90 s job on a 60 s schedule ----------------------------------------------------


def drive_overlap(tenant: uuid.UUID, policy: OverlapPolicy) -> tuple[str, dict[uuid.UUID, int]]:
    """Ten simulated minutes of ``* * * * *`` (the first nominal instant at T0), each job
    finished 90 s after it started; returns the schedule and each job's start (s after T0).

    Every start and end falls on a multiple of 30 s, so ticking every 30 s sees each one when
    the ticker would; as in the pure simulation a job ending at a tick is done before it."""
    schedule_id = create(tenant, now=T0 - timedelta(seconds=1), overlap_policy=policy.value)
    starts: dict[uuid.UUID, int] = {}
    for second in range(0, 600, 30):
        finish(
            [
                job_id
                for job_id, start in starts.items()
                if start + 90 <= second and job_status(job_id) == JobStatus.queued
            ]
        )
        service.tick(now=T0 + timedelta(seconds=second))
        for job in jobs_of(schedule_id):
            starts.setdefault(job.id, second)
    return schedule_id, starts


def job_status(job_id: uuid.UUID) -> JobStatus:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status


# The sequences the simulation gives (fired at, started at; skipped; still buffered), written
# out so the behaviour reads here too.
EXPECTED_OVERLAP: dict[OverlapPolicy, tuple[list[tuple[int, int]], list[int], list[int]]] = {
    OverlapPolicy.skip: (
        [(0, 0), (120, 120), (240, 240), (360, 360), (480, 480)],
        [60, 180, 300, 420, 540],
        [],
    ),
    OverlapPolicy.buffer_one: (
        [(0, 0), (60, 90), (120, 180), (180, 270), (300, 360), (360, 450), (480, 540)],
        [240, 420],
        [540],
    ),
    OverlapPolicy.buffer_all: ([(k * 60, k * 90) for k in range(7)], [], [420, 480, 540]),
    OverlapPolicy.allow_all: ([(k * 60, k * 60) for k in range(10)], [], []),
    OverlapPolicy.cancel_other: ([(k * 60, k * 60) for k in range(10)], [], []),
}


@pytest.mark.parametrize("policy", list(OverlapPolicy))
def test_each_overlap_policy_with_a_90s_job_on_a_60s_schedule_acts_as_the_plan_says(
    tenant: uuid.UUID, policy: OverlapPolicy
) -> None:
    schedule_id, starts = drive_overlap(tenant, policy)
    sim = simulate(policy)  # the pure decisions, second by second (tests/unit)
    jobs = jobs_of(schedule_id)
    seconds = {job.id: int((nominal(job) - T0).total_seconds()) for job in jobs}
    assert sorted((seconds[job.id], starts[job.id]) for job in jobs) == sorted(started(sim))
    statuses = {int((at - T0).total_seconds()): status for at, _, status in firings(schedule_id)}
    assert statuses == {
        **{run.fired_at: "fired" for run in sim.runs},
        **{second: "skipped" for second in sim.skipped},
        **{second: "buffered" for second in sim.waiting},
    }
    cancelled = {run.fired_at for run in sim.runs if run.cancelled}
    assert {seconds[job.id] for job in jobs if job.status == JobStatus.cancelled} == cancelled
    assert EXPECTED_OVERLAP[policy] == (started(sim), sim.skipped, sim.waiting)


# --- catch-up after 2 h of downtime ------------------------------------------------------------

QUARTERS = "*/15 * * * *"


def at(clock: str, day: str = "2026-06-01") -> datetime:
    return datetime.fromisoformat(f"{day}T{clock}").replace(tzinfo=UTC)


def clock_times(*clock: str) -> list[datetime]:
    return [at(hh_mm) for hh_mm in clock]


def after_downtime(tenant: uuid.UUID, catchup: str, window: int, back: str) -> str:
    """A quarter-hourly schedule (allow_all, so catch-up is all that decides) whose ticker
    fired 08:00 and was then down until ``back``."""
    schedule_id = create(
        tenant,
        now=at("07:50"),
        cron=QUARTERS,
        overlap_policy="allow_all",
        catchup=catchup,
        catchup_window=window,
    )
    assert service.tick(now=at("08:00:02")) == 1
    while service.tick(now=at(back)):
        pass
    return schedule_id


DOWNTIME = ["08:15", "08:30", "08:45", "09:00", "09:15", "09:30", "09:45", "10:00"]


@pytest.mark.parametrize(
    ("catchup", "window", "back", "fired"),
    [
        ("all", 3600, "10:00:05", ["09:15", "09:30", "09:45", "10:00"]),
        ("latest", 3600, "10:00:05", ["10:00"]),
        ("none", 3600, "10:00:05", ["10:00"]),
        # Back 7 minutes after the last instant: latest still catches it up, none does not.
        ("all", 3600, "10:07:00", ["09:15", "09:30", "09:45", "10:00"]),
        ("latest", 3600, "10:07:00", ["10:00"]),
        ("none", 3600, "10:07:00", []),
        # A 20-minute window.
        ("all", 1200, "10:00:05", ["09:45", "10:00"]),
        ("latest", 1200, "10:00:05", ["10:00"]),
        ("none", 1200, "10:00:05", ["10:00"]),
        # A 5-minute window, back after 7: even the latest instant is too old.
        ("all", 300, "10:07:00", []),
        ("latest", 300, "10:07:00", []),
    ],
)
def test_two_hours_of_downtime_fire_and_miss_by_the_catchup_mode(
    tenant: uuid.UUID, catchup: str, window: int, back: str, fired: list[str]
) -> None:
    schedule_id = after_downtime(tenant, catchup, window, back)
    expected = [(at("08:00"), "cadence", "fired")] + [
        (at(clock), "cadence", "fired" if clock in fired else "missed") for clock in DOWNTIME
    ]
    assert firings(schedule_id) == expected
    jobs = jobs_of(schedule_id)
    assert [job.scheduled_for for job in jobs] == clock_times("08:00", *fired)
    if fired:
        # The first firing after downtime covers back to the instant before it, fired or not:
        # no gap since the last summary and no overlap with it.
        first = at(fired[0])
        assert jobs[1].request["messages"][0]["content"] == (
            f"Summarise tickets from {first - minutes(15):%Y-%m-%dT%H:%M:%SZ} "
            f"to {first:%Y-%m-%dT%H:%M:%SZ}"
        )
    # Back on time afterwards, whatever the mode.
    with session_scope() as session:
        schedule = session.get(Schedule, schedule_id)
        assert schedule is not None
        assert schedule.next_fire_at == at("10:15")
    service.tick(now=at("10:30:01"))
    assert firings(schedule_id)[-1] == (at("10:30"), "cadence", "fired")


def test_a_downtime_longer_than_a_tick_can_handle_is_handled_over_several_ticks(
    tenant: uuid.UUID,
) -> None:
    """Every minute for 2 h: 120 instants, more than one tick decides (100), none lost."""
    schedule_id = create(tenant, now=at("07:59:30"), overlap_policy="allow_all")
    assert service.tick(now=at("08:00:01")) == 1
    counts = []
    while count := service.tick(now=at("10:00:05")):
        counts.append(count)
    rows = firings(schedule_id)
    assert [row[0] for row in rows] == [at("08:00") + minutes(k) for k in range(121)]
    statuses = [row[2] for row in rows]
    # The window is 1 h: 09:00:05 and later fire (09:01 .. 10:00), the rest are missed.
    assert statuses == ["fired"] + ["missed"] * 60 + ["fired"] * 60
    assert counts == [40, 20]  # the first tick decides 100 (60 missed, 40 fired), the next 20


# --- DST through the ticker --------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    zone: str
    at: datetime  # the instant the offset changes, UTC
    fixed: dict[str, list[datetime]]  # fixed-time cron -> its fire instants around `at`
    next_two: tuple[str, list[datetime]]  # a fixed cron's next_fire_times, seen before it


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _spring(zone: str, at: str, day_after: str) -> Transition:
    """The 02:xx hour does not exist: 30 2 fires once, at the gap's end (the transition)."""
    return Transition(
        zone, utc(at), {"30 2 * * *": [utc(at)]}, ("30 2 * * *", [utc(at), utc(day_after)])
    )


BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"
TRANSITIONS = [
    # Berlin: 02:00 CET -> 03:00 CEST at 01:00 UTC; 03:00 CEST -> 02:00 CET at 01:00 UTC.
    _spring(BERLIN, "2026-03-29T01:00", "2026-03-30T00:30"),
    Transition(
        BERLIN,
        utc("2026-10-25T01:00"),
        {"30 2 * * *": [utc("2026-10-25T00:30")]},  # 02:30 CEST only, not 02:30 CET
        ("30 2 * * *", [utc("2026-10-25T00:30"), utc("2026-10-26T01:30")]),
    ),
    _spring(BERLIN, "2027-03-28T01:00", "2027-03-29T00:30"),
    Transition(
        BERLIN,
        utc("2027-10-31T01:00"),
        {"30 2 * * *": [utc("2027-10-31T00:30")]},
        ("30 2 * * *", [utc("2027-10-31T00:30"), utc("2027-11-01T01:30")]),
    ),
    # New York: 02:00 EST -> 03:00 EDT at 07:00 UTC; 02:00 EDT -> 01:00 EST at 06:00 UTC.
    _spring(NEW_YORK, "2026-03-08T07:00", "2026-03-09T06:30"),
    Transition(
        NEW_YORK,
        utc("2026-11-01T06:00"),
        # 01:30 EDT only, not 01:30 EST; 02:30 happens once (EST).
        {"30 1 * * *": [utc("2026-11-01T05:30")], "30 2 * * *": [utc("2026-11-01T07:30")]},
        ("30 1 * * *", [utc("2026-11-01T05:30"), utc("2026-11-02T06:30")]),
    ),
    _spring(NEW_YORK, "2027-03-14T07:00", "2027-03-15T06:30"),
    Transition(
        NEW_YORK,
        utc("2027-11-07T06:00"),
        {"30 1 * * *": [utc("2027-11-07T05:30")], "30 2 * * *": [utc("2027-11-07T07:30")]},
        ("30 1 * * *", [utc("2027-11-07T05:30"), utc("2027-11-08T06:30")]),
    ),
]


@pytest.mark.parametrize("transition", TRANSITIONS, ids=lambda t: f"{t.zone}-{t.at:%Y-%m-%d}")
def test_dst_transitions_fire_fixed_times_once_and_hourly_on_real_time_cadence(
    tenant: uuid.UUID, transition: Transition
) -> None:
    """Ticked every minute from 100 minutes before the offset change to 100 after."""
    start, end = transition.at - minutes(100), transition.at + minutes(100)
    offsets = {transition.at.astimezone(ZoneInfo(transition.zone)).utcoffset()}
    offsets.add(
        (transition.at - timedelta(seconds=1)).astimezone(ZoneInfo(transition.zone)).utcoffset()
    )
    assert len(offsets) == 2  # the tz database agrees this is a transition

    crons = [*transition.fixed, "0 * * * *"]
    ids = {
        expression: create(
            tenant, now=start, cron=expression, timezone=transition.zone, overlap_policy="allow_all"
        )
        for expression in crons
    }
    with session_scope() as session:
        expression, upcoming = transition.next_two
        schedule = session.get(Schedule, ids[expression])
        assert schedule is not None
        assert service.next_fire_times(schedule)[:2] == upcoming  # the shift shows in advance
    ticked_at: dict[uuid.UUID, datetime] = {}
    now = start
    while now < end:
        now += minutes(1)
        if not service.tick(now=now + timedelta(seconds=1)):
            continue
        for schedule_id in ids.values():
            for job in jobs_of(schedule_id):
                ticked_at.setdefault(job.id, now)
    hourly = [transition.at + timedelta(hours=h) for h in (-1, 0, 1)]
    for expression, schedule_id in ids.items():
        expected = transition.fixed.get(expression, hourly)
        jobs = jobs_of(schedule_id)
        assert [job.scheduled_for for job in jobs] == expected, expression
        assert [ticked_at[job.id] for job in jobs] == expected  # each on the first tick due
        assert [row[2] for row in firings(schedule_id)] == ["fired"] * len(expected)


# --- end_at and max_runs -----------------------------------------------------------------------


def schedule_row(schedule_id: str) -> Schedule:
    with session_scope() as session:
        schedule = session.get(Schedule, schedule_id)
        assert schedule is not None
        session.expunge(schedule)
        return schedule


def tick_minutes(first: int, last: int, *, then: Any = None) -> None:
    """Tick 1 s after each minute T0+first .. T0+last; ``then(minute)`` after each tick."""
    for minute in range(first, last + 1):
        service.tick(now=T0 + minutes(minute) + timedelta(seconds=1))
        if then is not None:
            then(minute)


def test_end_at_is_the_last_instant_and_then_the_schedule_is_done(tenant: uuid.UUID) -> None:
    schedule_id = create(tenant, overlap_policy="allow_all", end_at=T0 + minutes(3))
    upcoming = [T0 + minutes(k) for k in (1, 2, 3)]
    assert service.next_fire_times(schedule_row(schedule_id)) == upcoming
    tick_minutes(1, 10)
    assert firings(schedule_id) == [(moment, "cadence", "fired") for moment in upcoming]
    assert [job.scheduled_for for job in jobs_of(schedule_id)] == upcoming
    done = schedule_row(schedule_id)
    assert done.next_fire_at is None and service.next_fire_times(done) == []


def test_max_runs_stops_after_that_many_runs(tenant: uuid.UUID) -> None:
    schedule_id = create(tenant, overlap_policy="allow_all", max_runs=2)
    assert service.next_fire_times(schedule_row(schedule_id)) == [T0 + minutes(1), T0 + minutes(2)]
    tick_minutes(1, 10)
    assert [row[0] for row in firings(schedule_id)] == [T0 + minutes(1), T0 + minutes(2)]
    assert len(jobs_of(schedule_id)) == 2
    done = schedule_row(schedule_id)
    assert (done.runs, done.next_fire_at, service.next_fire_times(done)) == (2, None, [])


def test_max_runs_counts_runs_not_firings_skipped_for_overlap(tenant: uuid.UUID) -> None:
    """skip, each job 90 s: minutes 1, 3 and 5 run, 2 and 4 are skipped, then it is done."""
    schedule_id = create(tenant, max_runs=3)

    def finish_previous(minute: int) -> None:
        # Done before the next tick: the jobs that fired a minute ago or earlier.
        finish([job.id for job in jobs_of(schedule_id) if nominal(job) < T0 + minutes(minute)])

    tick_minutes(1, 10, then=finish_previous)
    assert [(row[0], row[2]) for row in firings(schedule_id)] == [
        (T0 + minutes(1), "fired"),
        (T0 + minutes(2), "skipped"),
        (T0 + minutes(3), "fired"),
        (T0 + minutes(4), "skipped"),
        (T0 + minutes(5), "fired"),
    ]
    done = schedule_row(schedule_id)
    assert (done.runs, done.next_fire_at) == (3, None)


# --- trigger and backfill ----------------------------------------------------------------------


def trigger(tenant: uuid.UUID, schedule_id: str, now: datetime) -> tuple[str, uuid.UUID | None]:
    with session_scope() as session:
        firing, fired = service.trigger(session, tenant_id=tenant, schedule_id=schedule_id, now=now)
        outcome = (firing.status, firing.job_id)
        assert (firing.scheduled_for, firing.reason) == (now, "trigger")
    fired.after_commit()
    return outcome


def test_trigger_fires_now_outside_the_cadence_under_the_overlap_policy(
    tenant: uuid.UUID,
) -> None:
    schedule_id = create(tenant, cron="0 7 * * *", timezone="Europe/Berlin")
    first = T0 + minutes(5)
    status, job_id = trigger(tenant, schedule_id, first)
    assert status == "fired" and job_id is not None
    (job,) = jobs_of(schedule_id)
    assert (job.id, job.schedule_id, job.scheduled_for) == (job_id, schedule_id, first)
    # Its window reaches back to the cron's previous instant (07:00 CEST today).
    assert job.request["messages"][0]["content"] == (
        "Summarise tickets from 2026-06-01T05:00:00Z to 2026-06-01T08:05:00Z"
    )
    assert trigger(tenant, schedule_id, first + minutes(1)) == ("skipped", None)  # skip: running
    finish([job_id])
    status, _ = trigger(tenant, schedule_id, first + minutes(2))
    assert status == "fired" and len(jobs_of(schedule_id)) == 2
    # The cadence is untouched.
    assert schedule_row(schedule_id).next_fire_at == datetime(2026, 6, 2, 5, 0, tzinfo=UTC)


def backfill(
    tenant: uuid.UUID, schedule_id: str, start: datetime, end: datetime, now: datetime
) -> service.Backfilled:
    with session_scope() as session:
        done, fired = service.backfill(
            session, tenant_id=tenant, schedule_id=schedule_id, start=start, end=end, now=now
        )
    fired.after_commit()
    return done


def test_backfill_fires_each_instant_of_the_range_once_at_the_backfill_priority(
    tenant: uuid.UUID,
) -> None:
    schedule_id = create(tenant, cron=QUARTERS)  # skip: a backfill ignores it
    instants = clock_times("06:00", "06:15", "06:30", "06:45", "07:00")
    first = backfill(tenant, schedule_id, at("06:00"), at("07:00"), now=T0)
    assert (first.fired, first.existing) == (instants, [])
    again = backfill(tenant, schedule_id, at("05:50"), at("07:10"), now=T0)
    assert (again.fired, again.existing) == ([], instants)
    assert firings(schedule_id) == [(moment, "backfill", "fired") for moment in instants]
    jobs = jobs_of(schedule_id)
    assert [job.scheduled_for for job in jobs] == instants
    assert {job.priority for job in jobs} == {PRIORITY_BACKFILL}
    assert jobs[0].request["messages"][0]["content"] == (
        "Summarise tickets from 2026-06-01T05:45:00Z to 2026-06-01T06:00:00Z"
    )


def test_a_backfill_and_a_late_ticker_fire_a_shared_instant_once(tenant: uuid.UUID) -> None:
    schedule_id = create(tenant, cron=QUARTERS, overlap_policy="allow_all")
    # The ticker was down since 08:00; a backfill at 08:40 fires 08:15 and 08:30 first.
    done = backfill(tenant, schedule_id, at("08:10"), at("08:30"), now=at("08:40"))
    assert done.fired == clock_times("08:15", "08:30")
    service.tick(now=at("08:45:01"))
    assert firings(schedule_id) == [
        (at("08:15"), "backfill", "fired"),
        (at("08:30"), "backfill", "fired"),
        (at("08:45"), "cadence", "fired"),
    ]
    assert [job.scheduled_for for job in jobs_of(schedule_id)] == clock_times(
        "08:15", "08:30", "08:45"
    )
    assert schedule_row(schedule_id).runs == 1  # the ticker ran 08:45 only


def test_backfill_keeps_a_priority_the_template_sets(tenant: uuid.UUID) -> None:
    schedule_id = create(tenant, cron=QUARTERS, template={**SUMMARY, "priority": 5})
    backfill(tenant, schedule_id, at("06:00"), at("06:30"), now=T0)
    assert {job.priority for job in jobs_of(schedule_id)} == {5}


def test_backfill_refuses_a_future_range_and_one_of_more_than_1000_instants(
    tenant: uuid.UUID,
) -> None:
    schedule_id = create(tenant)
    with pytest.raises(InvalidRequest, match="future"):
        backfill(tenant, schedule_id, T0 - minutes(10), T0 + minutes(1), now=T0)
    with pytest.raises(InvalidRequest, match="more than 1000"):
        backfill(tenant, schedule_id, T0 - minutes(1001), T0, now=T0)
    done = backfill(tenant, schedule_id, T0 - minutes(999), T0, now=T0)  # 1000 exactly
    assert len(done.fired) == 1000
    assert len(firings(schedule_id)) == 1000


# --- a batch template --------------------------------------------------------------------------


def upload_batch_file(tenant: uuid.UUID, lines: int = 3) -> str:
    return batch_core.upload_batch_file(tenant, lines)


def batch_status(batch_id: str) -> str:
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return batch.status


def test_a_batch_template_fires_a_batch(tenant: uuid.UUID) -> None:
    file_id = upload_batch_file(tenant)
    schedule_id = create(
        tenant,
        kind="batch",
        template={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"day": "{{date}}"},
        },
    )
    assert service.tick(now=T0 + minutes(1) + timedelta(seconds=1)) == 1
    with session_scope() as session:
        firing = session.scalars(
            select(ScheduleFiring).where(ScheduleFiring.schedule_id == schedule_id)
        ).one()
        assert (firing.status, firing.job_id) == ("fired", None)
        batch = session.get(Batch, firing.batch_id)
        assert batch is not None
        assert (batch.tenant_id, batch.metadata_) == (tenant, {"day": "2026-06-01"})
        batch_id = batch.id
    # The ticker's process validates it on its own threads; ingest here, whoever is first.
    batches.ingest(batch_id)
    wait_for(lambda: batch_status(batch_id) == "in_progress")
    # An in_progress batch occupies the schedule like a running job (skip).
    service.tick(now=T0 + minutes(2) + timedelta(seconds=1))
    assert [row[2] for row in firings(schedule_id)] == ["fired", "skipped"]


def test_cancel_other_cancels_a_running_batch_and_its_lines(tenant: uuid.UUID) -> None:
    file_id = upload_batch_file(tenant)
    schedule_id = create(
        tenant, kind="batch", template={"input_file_id": file_id}, overlap_policy="cancel_other"
    )
    service.tick(now=T0 + minutes(1) + timedelta(seconds=1))
    first = firing_batches(schedule_id)[0]
    batches.ingest(first)
    wait_for(lambda: batch_status(first) == "in_progress")
    service.tick(now=T0 + minutes(2) + timedelta(seconds=1))
    # The first batch is cancelled with its lines (after the tick's commit, as the API's
    # cancel does), and the second one fired.
    assert batch_status(first) == "cancelled"
    assert len(firing_batches(schedule_id)) == 2


def firing_batches(schedule_id: str) -> list[str]:
    with session_scope() as session:
        return [
            batch_id
            for batch_id in session.scalars(
                select(ScheduleFiring.batch_id)
                .where(ScheduleFiring.schedule_id == schedule_id)
                .order_by(ScheduleFiring.scheduled_for)
            )
            if batch_id is not None
        ]


def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- pause_after_failures ----------------------------------------------------------------------


def test_jobs_failing_n_times_in_a_row_pause_the_schedule_and_a_success_resets_the_count(
    tenant: uuid.UUID,
) -> None:
    schedule_id = create(tenant, pause_after_failures=3, webhook_url="https://example.com/hook")
    outcomes = {1: JobStatus.failed, 2: JobStatus.failed, 3: JobStatus.succeeded}
    outcomes |= {4: JobStatus.failed, 5: JobStatus.failed, 6: JobStatus.failed}

    def end_this_minutes_job(minute: int) -> None:
        for job in jobs_of(schedule_id):
            if nominal(job) == T0 + minutes(minute):
                finish([job.id], outcomes[minute])

    tick_minutes(1, 10, then=end_this_minutes_job)
    # The 6th failure in all but the 3rd in a row is seen at 08:07, which pauses instead.
    assert [row[0] for row in firings(schedule_id)] == [T0 + minutes(k) for k in range(1, 7)]
    paused = schedule_row(schedule_id)
    assert paused.paused and paused.failures == 3
    assert paused.note == "paused after 3 failed firings in a row"
    with session_scope() as session:
        events = session.scalars(
            select(WebhookDelivery.event_type).where(WebhookDelivery.schedule_id == schedule_id)
        ).all()
    assert events == ["schedule.paused"]
    # Resumed at 08:12:30: it fires from then on, nothing for the paused time.
    with session_scope() as session:
        service.update_schedule(
            session,
            tenant_id=tenant,
            schedule_id=schedule_id,
            changes={"paused": False},
            now=T0 + minutes(12.5),
        )
    tick_minutes(11, 14)
    assert [row[0] for row in firings(schedule_id)][6:] == [T0 + minutes(13), T0 + minutes(14)]
    assert schedule_row(schedule_id).failures == 0


def test_a_template_that_cannot_be_submitted_fails_its_firing_and_counts(
    tenant: uuid.UUID,
) -> None:
    too_long = {
        "request": {
            "model": "gpt-4",  # an 8192-token window
            "messages": [{"role": "user", "content": "summarise " * 10_000}],
        },
        "long_context": {"strategy": "error"},
    }
    schedule_id = create(tenant, template=too_long, pause_after_failures=2)
    tick_minutes(1, 5)
    with session_scope() as session:
        rows = session.scalars(
            select(ScheduleFiring)
            .where(ScheduleFiring.schedule_id == schedule_id)
            .order_by(ScheduleFiring.scheduled_for)
        ).all()
        assert [(row.status, row.job_id, row.open) for row in rows] == [("failed", None, False)] * 2
        assert rows[0].error is not None and rows[0].error["type"] == "ContextTooLong"
    assert jobs_of(schedule_id) == []
    paused = schedule_row(schedule_id)
    assert (paused.paused, paused.failures) == (True, 2)


def test_a_batch_template_whose_file_was_deleted_fails_its_firing(tenant: uuid.UUID) -> None:
    file_id = upload_batch_file(tenant)
    schedule_id = create(
        tenant, kind="batch", template={"input_file_id": file_id}, pause_after_failures=5
    )
    with session_scope() as session:
        files.delete_file(session, tenant_id=tenant, file_id=file_id)
    tick_minutes(1, 2)
    rows = firings(schedule_id)
    assert [row[2] for row in rows] == ["failed", "failed"]
    assert schedule_row(schedule_id).failures == 2


def test_extending_a_finished_schedule_fires_from_then_on_not_for_the_time_between(
    tenant: uuid.UUID,
) -> None:
    runs_out = create(tenant, overlap_policy="allow_all", max_runs=1)
    ends = create(tenant, overlap_policy="allow_all", end_at=T0 + minutes(1))
    tick_minutes(1, 2)
    for schedule_id, change in ((runs_out, {"max_runs": 3}), (ends, {"end_at": None})):
        assert schedule_row(schedule_id).next_fire_at is None
        with session_scope() as session:
            service.update_schedule(
                session,
                tenant_id=tenant,
                schedule_id=schedule_id,
                changes=change,
                now=T0 + minutes(30.5),
            )
        assert schedule_row(schedule_id).next_fire_at == T0 + minutes(31)
    tick_minutes(31, 31)
    for schedule_id in (runs_out, ends):
        assert [row[0] for row in firings(schedule_id)] == [T0 + minutes(1), T0 + minutes(31)]


def test_a_schedule_that_no_longer_parses_is_paused_and_the_others_still_fire(
    tenant: uuid.UUID,
) -> None:
    """A row this version refuses (a zone gone from tzdata, a cron an older version took)
    must not stop the ticker for every schedule."""
    broken = create(tenant, overlap_policy="allow_all")
    healthy = create(tenant, overlap_policy="allow_all")
    with session_scope() as session:
        session.execute(
            update(Schedule).where(Schedule.id == broken).values(timezone="Mars/Olympus_Mons")
        )
    tick_minutes(1, 2)
    assert [row[0] for row in firings(healthy)] == [T0 + minutes(1), T0 + minutes(2)]
    assert firings(broken) == []
    halted = schedule_row(broken)
    assert halted.paused and halted.note is not None and "Mars/Olympus_Mons" in halted.note
