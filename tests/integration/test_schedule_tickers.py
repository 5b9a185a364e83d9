"""Three real beat processes tick one database's schedules at once, over real minutes.

Slow by nature (one to two minutes of wall time): what it proves only happens at real minute
boundaries, with three ``chatjobs beat`` processes (as ``make run`` and the MiniStack start
beat: each runs the schedule ticker every CHATJOBS_SCHEDULE_TICK_SECONDS on a thread of its
own) racing for the same schedules. Every (schedule, nominal minute) must get exactly one
firing row and exactly one job, and no minute boundary between creation and stop may be
left without one. The in-process variant with an injected clock is in test_schedules.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from chatjobs.db import session_scope
from chatjobs.models import Job, JobStatus, ScheduleFiring
from chatjobs.schedules import service
from chatjobs.testing import Proc, python_cli
from tests.integration.test_schedules import SUMMARY

pytestmark = [
    pytest.mark.integration,
    # Two real minute boundaries after the schedules exist: up to ~125 s of waiting.
    pytest.mark.timeout(240),
]

TICKERS = 3
EVERY_MINUTE = 30
# Policies that meet a job still queued at the next minute (no worker runs here), and the
# statuses their first two firings must have.
OTHERS = {
    "skip": ["fired", "skipped"],
    "buffer_one": ["fired", "buffered"],
    "buffer_all": ["fired", "buffered"],
    "cancel_other": ["fired", "fired"],
}


@pytest.fixture
def tickers(stack_env: dict[str, str], queue: str, run_dir: Path) -> Iterator[list[Proc]]:
    """Three beat processes on this test's queue (their dispatchers admit the fired jobs to a
    broker list no worker reads, so the jobs stay queued)."""
    env = {**stack_env, "CHATJOBS_QUEUE_NAME": queue}
    procs = [
        Proc(
            f"beat-{n}",
            python_cli("beat", "--loglevel", "INFO"),
            env,
            run_dir / f"{queue}-beat-{n}.log",
        ).start()
        for n in range(TICKERS)
    ]
    yield procs
    for proc in procs:
        proc.stop()


def create(tenant: uuid.UUID, policy: str, now: datetime) -> str:
    with session_scope() as session:
        spec = service.Spec(cron="* * * * *", template=SUMMARY, overlap_policy=policy)
        return service.create_schedule(session, tenant_id=tenant, spec=spec, now=now).id


def fired_minutes(schedule_ids: list[str]) -> dict[str, list[tuple[datetime, str]]]:
    with session_scope() as session:
        rows = session.execute(
            select(ScheduleFiring.schedule_id, ScheduleFiring.scheduled_for, ScheduleFiring.status)
            .where(ScheduleFiring.schedule_id.in_(schedule_ids))
            .order_by(ScheduleFiring.scheduled_for)
        ).all()
    by_schedule: dict[str, list[tuple[datetime, str]]] = {sid: [] for sid in schedule_ids}
    for schedule_id, scheduled_for, status in rows:
        by_schedule[schedule_id].append((scheduled_for.astimezone(UTC), status))
    return by_schedule


def test_three_beat_processes_fire_each_schedule_once_a_minute_without_gaps(
    tenant: uuid.UUID, tickers: list[Proc]
) -> None:
    created = datetime.now(UTC)
    every = [create(tenant, "allow_all", created) for _ in range(EVERY_MINUTE)]
    others = {create(tenant, policy, created): policy for policy in OTHERS}
    first = created.replace(second=0, microsecond=0) + timedelta(minutes=1)
    wanted = [first, first + timedelta(minutes=1)]

    # Poll until every schedule has fired both boundaries (each tick is 1 s; the second
    # boundary is at most two minutes away).
    deadline = time.monotonic() + 180
    while True:
        seen = fired_minutes([*every, *others])
        if all([moment for moment, _ in rows][:2] == wanted for rows in seen.values()):
            break
        assert time.monotonic() < deadline, f"not every boundary fired: {seen}"
        for proc in tickers:
            assert proc.popen is not None and proc.popen.poll() is None, proc.log_tail()
        time.sleep(0.5)
    for proc in tickers:  # all three were ticking the whole time
        assert proc.popen is not None and proc.popen.poll() is None, proc.log_tail()
        proc.stop()

    seen = fired_minutes([*every, *others])
    for schedule_id, rows in seen.items():
        moments = [moment for moment, _ in rows]
        # The boundaries from the first on, none twice and none left out (a third may have
        # passed while stopping).
        assert moments == [first + timedelta(minutes=k) for k in range(len(moments))]
        assert len(moments) >= 2, schedule_id
    for schedule_id in every:
        assert {status for _, status in seen[schedule_id]} == {"fired"}
    for schedule_id, policy in others.items():
        assert [status for _, status in seen[schedule_id]][:2] == OTHERS[policy], policy

    with session_scope() as session:
        per_firing = session.execute(
            select(Job.schedule_id, Job.scheduled_for, func.count())
            .where(Job.schedule_id.in_([*every, *others]))
            .group_by(Job.schedule_id, Job.scheduled_for)
        ).all()
        fired = session.execute(
            select(ScheduleFiring.schedule_id, ScheduleFiring.scheduled_for, Job.id)
            .outerjoin(Job, Job.id == ScheduleFiring.job_id)
            .where(
                ScheduleFiring.schedule_id.in_([*every, *others]),
                ScheduleFiring.status == "fired",
            )
        ).all()
        cancelled = session.scalars(
            select(Job.status).where(
                Job.schedule_id.in_([sid for sid, p in others.items() if p == "cancel_other"]),
                Job.scheduled_for == first,
            )
        ).all()
    assert {count for _, _, count in per_firing} == {1}  # one job per (schedule, minute)
    assert all(job_id is not None for _, _, job_id in fired)  # and every firing has its job
    assert {(sid, at) for sid, at, _ in fired} == {(sid, at) for sid, at, _ in per_firing}
    assert cancelled == [JobStatus.cancelled]
