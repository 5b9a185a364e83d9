"""The schedule engine on real Postgres with an injected clock (chatjobs.schedules.service):
firings exactly once, template variables from nominal times, overlap, catch-up, DST, end_at
and max_runs, triggers, backfills and batch templates.

Each test runs on a queue of its own (the ``queue`` fixture) and calls ``tick(now=...)``
itself, as beat's ticker would; no worker runs, so a job's end is written by the test.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from chatjobs.db import session_scope
from chatjobs.models import Job, JobStatus, Schedule, ScheduleFiring
from chatjobs.schedules import service

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
            list(pool.map(lambda _: service.tick(now=now), range(3)))
    nominal = [T0 + minutes(step) for step in range(1, 6)]
    assert [f[0] for f in firings(schedule_id)] == nominal
    assert [job.scheduled_for for job in jobs_of(schedule_id)] == nominal
