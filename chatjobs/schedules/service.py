"""Schedules in Postgres: create, read, change and delete them, and the ticker that fires them.

Every firing is a ``schedule_firings`` row, unique per (schedule, nominal instant), inserted
in the same transaction as the job (or batch) it submits, with ``INSERT ... ON CONFLICT DO
NOTHING``: whichever ticker, retry, trigger or repeated backfill gets there second inserts
nothing and submits nothing. Any number of tickers may run (beat runs one; several beats are
safe); each takes the schedules it works on with ``FOR UPDATE SKIP LOCKED``.

A tick, per schedule (chatjobs.schedules.plan decides, this module writes):

1. **settle**: the firings still ``open`` (fired, their job or batch not yet seen ended) are
   looked at; the ended ones close, counting consecutive failures (a failed or expired job, a
   failed or expired batch, a template that could not be submitted) or resetting the count on
   a success. ``pause_after_failures`` failures in a row pause the schedule, with a note and a
   ``schedule.paused`` webhook.
2. **release**: with nothing open, the oldest ``buffered`` firing starts.
3. **fire**: the nominal instants due since the cursor, by the catch-up rules, each met by the
   overlap policy: started, buffered, skipped or (``cancel_other``) started after cancelling
   the open ones; those past the catch-up window are recorded ``missed``.

``max_runs`` counts runs: firings started or buffered to start, not those skipped for overlap
nor an instant a backfill fired first. A schedule the ticker cannot work on is left out of
that tick (a savepoint each), and one that no longer parses (a zone gone from tzdata, a cron
an older version took) is paused with the reason as its note, so no row stops the ticker for
the rest of the queue.

Resuming a paused schedule moves its cursor to the moment of the resume: instants that passed
while it was paused are neither fired nor recorded (a pause is a decision, not downtime).
Changing the cron, zone or start moves it the same way, so a new cadence never fires for the
past; so does giving a finished schedule a later ``end_at`` or more ``max_runs``. A trigger
fires once at the moment it is asked for, under the overlap policy; a backfill fires every
nominal instant of a past range that has no firing yet, at the backfill priority, whatever is
running (backfills are for catching up, and the dispatcher paces them).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs import deliveries, jobs, metrics
from chatjobs.batches import service as batches
from chatjobs.db import session_scope
from chatjobs.errors import ChatJobsError, Conflict, InvalidRequest, NotFound
from chatjobs.jobs.dispatch import PRIORITY_BACKFILL
from chatjobs.models import Batch, Job, Schedule, ScheduleFiring, Tenant, uuid7
from chatjobs.schedules import cron, plan
from chatjobs.schedules.template import (
    check_template_variables,
    render_template,
    template_variables,
)
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings
from chatjobs.storable import storable

log = logging.getLogger("chatjobs.schedules")

MAX_SCHEDULES_PER_TENANT = 1000
# Nominal instants one backfill may fire (a wider range: several calls).
MAX_BACKFILL = 1000
# Schedules one tick works on per step; the rest wait for the next tick.
TICK_SCHEDULES = 100
NEXT_FIRES = 5

_JOB_ACTIVE = ("queued", "retrying", "running")
_JOB_FAILED = ("failed", "expired")
_BATCH_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_BATCH_FAILED = ("failed", "expired")


class ScheduleNotFound(NotFound):
    """No schedule with that id is visible to this tenant."""


class TooManySchedules(Conflict):
    """The tenant has as many schedules as it may."""


@dataclass
class Spec:
    """A schedule as asked for (validated by the API's schema): what create and update take."""

    cron: str
    timezone: str = "UTC"
    kind: str = "job"  # "job" (a POST /v1/jobs body) or "batch" (a POST /v1/batches body)
    template: dict[str, Any] = field(default_factory=dict)
    start_at: datetime | None = None
    end_at: datetime | None = None
    paused: bool = False
    note: str | None = None
    overlap_policy: str = plan.DEFAULT_OVERLAP.value
    catchup: str = plan.DEFAULT_CATCHUP.value
    catchup_window: int = int(plan.DEFAULT_CATCHUP_WINDOW.total_seconds())
    max_runs: int | None = None
    pause_after_failures: int | None = None
    webhook_url: str | None = None
    metadata: dict[str, Any] | None = None


# Fields whose change moves the cursor to now (a new cadence never fires for the past).
_CADENCE = ("cron", "timezone", "start_at")
_FIELDS = tuple(Spec.__dataclass_fields__)


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now.astimezone(UTC)


def check(spec: Spec) -> None:
    """Refuse a schedule that can never work: InvalidSchedule naming the field and the rule."""
    cron.validate(spec.cron, spec.timezone)
    check_template_variables(spec.template)
    if spec.start_at is not None and spec.end_at is not None and spec.end_at <= spec.start_at:
        raise InvalidWindow("end_at: must be after start_at")


class InvalidWindow(cron.InvalidSchedule):
    """A schedule's end is not after its start."""

    field = "end_at"


# --- reading ----------------------------------------------------------------------------


def get_schedule(session: Session, *, tenant_id: uuid.UUID, schedule_id: str) -> Schedule:
    schedule = session.scalar(
        select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
    )
    if schedule is None:
        raise ScheduleNotFound(f"no schedule {schedule_id}")
    return schedule


def _locked(session: Session, tenant_id: uuid.UUID, schedule_id: str) -> Schedule:
    schedule = session.scalar(
        select(Schedule)
        .where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
        .with_for_update()
    )
    if schedule is None:
        raise ScheduleNotFound(f"no schedule {schedule_id}")
    return schedule


def list_schedules(
    session: Session, *, tenant_id: uuid.UUID, after: str | None, limit: int
) -> tuple[list[Schedule], bool]:
    """The tenant's schedules, newest first; (page, has_more)."""
    stmt = select(Schedule).where(Schedule.tenant_id == tenant_id)
    if after is not None:
        stmt = stmt.where(Schedule.id < after)
    rows = list(session.scalars(stmt.order_by(Schedule.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def next_fire_times(schedule: Schedule, n: int = NEXT_FIRES) -> list[datetime]:
    """The next ``n`` nominal instants the schedule will fire at (none while paused or done)."""
    if schedule.paused or schedule.next_fire_at is None:
        return []
    times = [schedule.next_fire_at]
    for moment in cron.fires_after(schedule.cron, schedule.timezone, schedule.next_fire_at):
        if len(times) >= n or (schedule.end_at is not None and moment > schedule.end_at):
            break
        times.append(moment)
    if schedule.max_runs is not None:
        times = times[: max(0, schedule.max_runs - schedule.runs)]
    return times


@dataclass(frozen=True)
class FiringRead:
    """A firing with what came of it: its job's or batch's status once it fired."""

    firing: ScheduleFiring
    outcome: str


def list_firings(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    schedule_id: str,
    after: uuid.UUID | None,
    limit: int,
) -> tuple[list[FiringRead], bool]:
    """A schedule's firings, latest nominal instant first; (page, has_more)."""
    get_schedule(session, tenant_id=tenant_id, schedule_id=schedule_id)
    stmt = (
        select(ScheduleFiring, Job.status, Batch.status)
        .outerjoin(Job, Job.id == ScheduleFiring.job_id)
        .outerjoin(Batch, Batch.id == ScheduleFiring.batch_id)
        .where(ScheduleFiring.schedule_id == schedule_id)
    )
    if after is not None:
        mark = select(ScheduleFiring.scheduled_for).where(
            ScheduleFiring.id == after, ScheduleFiring.schedule_id == schedule_id
        )
        stmt = stmt.where(ScheduleFiring.scheduled_for < mark.scalar_subquery())
    rows = session.execute(
        stmt.order_by(ScheduleFiring.scheduled_for.desc()).limit(limit + 1)
    ).all()
    page = [
        FiringRead(firing, outcome(firing.status, job_status, batch_status))
        for firing, job_status, batch_status in rows[:limit]
    ]
    return page, len(rows) > limit


def outcome(status: str, job_status: Any, batch_status: str | None) -> str:
    """What came of a firing: its job's or batch's status once it fired, else its own."""
    if status != "fired":
        return status
    if job_status is not None:
        return str(getattr(job_status, "value", job_status))
    return batch_status or status


# --- writing ----------------------------------------------------------------------------


def create_schedule(
    session: Session, *, tenant_id: uuid.UUID, spec: Spec, now: datetime | None = None
) -> Schedule:
    """Store a schedule; it fires from the first nominal instant after now (or start_at)."""
    check(spec)
    # The tenant's row, locked: concurrent creates count one after the other.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    count = session.scalar(
        select(func.count()).select_from(Schedule).where(Schedule.tenant_id == tenant_id)
    )
    if (count or 0) >= MAX_SCHEDULES_PER_TENANT:
        raise TooManySchedules(
            f"a tenant may have at most {MAX_SCHEDULES_PER_TENANT} schedules; delete one first"
        )
    moment = _now(now)
    schedule = Schedule(
        id=f"sched_{uuid7().hex}",
        tenant_id=tenant_id,
        queue=get_settings().queue_name,
        **_columns(spec),
        runs=0,
        failures=0,
        last_scheduled_for=moment,
    )
    schedule.next_fire_at = _next_after(schedule, moment)
    session.add(schedule)
    session.flush()
    session.refresh(schedule)
    return schedule


def _columns(spec: Spec) -> dict[str, Any]:
    values = {name: getattr(spec, name) for name in _FIELDS if name != "metadata"}
    values["metadata_"] = spec.metadata
    values["template"] = storable(spec.template)
    return values


def _next_after(schedule: Schedule, cursor: datetime) -> datetime | None:
    """The first nominal instant after ``cursor`` the schedule may fire at, if any."""
    if schedule.max_runs is not None and schedule.runs >= schedule.max_runs:
        return None
    after = cursor
    if schedule.start_at is not None:
        after = max(after, schedule.start_at - timedelta(microseconds=1))
    try:
        moment = cron.next_fire(schedule.cron, schedule.timezone, after)
    except cron.InvalidSchedule:
        return None
    if schedule.end_at is not None and moment > schedule.end_at:
        return None
    return moment


def update_schedule(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    schedule_id: str,
    changes: dict[str, Any],
    now: datetime | None = None,
) -> Schedule:
    """Change some fields (PATCH). Pausing stops firing; resuming, a new cron, zone or start,
    or a later end_at or more max_runs for a finished schedule, fires from now on (nothing
    for the time in between)."""
    schedule = _locked(session, tenant_id, schedule_id)
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {sorted(unknown)[0]}", param=sorted(unknown)[0])
    current = Spec(
        **{name: getattr(schedule, name) for name in _FIELDS if name != "metadata"},
        metadata=schedule.metadata_,
    )
    for name, value in changes.items():
        setattr(current, name, value)
    check(current)
    moment = _now(now)
    resumed = schedule.paused and changes.get("paused") is False
    cadence = any(name in changes and changes[name] != getattr(schedule, name) for name in _CADENCE)
    limits = bool({"end_at", "max_runs"} & set(changes))
    revived = limits and schedule.next_fire_at is None  # it had finished: like a resume
    for name, value in _columns(current).items():
        setattr(schedule, name, value)
    if resumed:
        schedule.failures = 0
    if resumed or cadence or revived:
        schedule.last_scheduled_for = max(schedule.last_scheduled_for or moment, moment)
    if resumed or cadence or limits:
        schedule.next_fire_at = _next_after(schedule, schedule.last_scheduled_for or moment)
    schedule.updated_at = func.now()
    session.flush()
    session.refresh(schedule)
    return schedule


def delete_schedule(session: Session, *, tenant_id: uuid.UUID, schedule_id: str) -> None:
    """Delete the schedule and its firings; the jobs it fired stay (with its id)."""
    schedule = _locked(session, tenant_id, schedule_id)
    session.delete(schedule)
    session.flush()


# --- firing -----------------------------------------------------------------------------


@dataclass
class Fired:
    """What a transaction fired: jobs to poke the dispatcher for and batches to validate,
    once it has committed."""

    jobs: list[uuid.UUID] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    # Batches moved to cancelling (cancel_other): their lines are ended after the commit,
    # as the API's cancel does.
    cancelling: list[str] = field(default_factory=list)
    firings: int = 0

    def add(self, other: Fired) -> None:
        self.jobs += other.jobs
        self.batches += other.batches
        self.cancelling += other.cancelling
        self.firings += other.firings

    def after_commit(self) -> None:
        if self.jobs:
            jobs.poke()
        for batch_id in self.cancelling:
            batches.end_all(batches.cancel_lines, batch_id)
        for batch_id in self.batches:
            batches.validate_soon(batch_id)


def _insert_firing(
    session: Session, schedule: Schedule, scheduled_for: datetime, reason: str, status: str
) -> ScheduleFiring | None:
    """The firing's row, or None if this nominal instant already has one."""
    firing_id = session.scalar(
        insert(ScheduleFiring)
        .values(
            id=uuid7(),
            schedule_id=schedule.id,
            scheduled_for=scheduled_for,
            reason=reason,
            status=status,
            open=False,
        )
        .on_conflict_do_nothing(constraint="uq_schedule_firings_schedule_id")
        .returning(ScheduleFiring.id)
    )
    if firing_id is None:
        return None
    if status != "fired":  # skipped, buffered or missed; one that fires is counted by _submit
        metrics.after_commit(session, "chatjobs_schedule_fires", status)
    return session.get(ScheduleFiring, firing_id)


def _submit(
    session: Session, schedule: Schedule, firing: ScheduleFiring, fired: Fired, *, backfill: bool
) -> None:
    """Submit the firing's job or batch in a savepoint; a template that cannot be submitted
    (invalid after rendering, too long for its model, a deleted input file) fails the firing,
    never the tick."""
    window_start = plan.window_start(schedule.cron, schedule.timezone, firing.scheduled_for)
    variables = template_variables(
        scheduled_for=firing.scheduled_for, window_start=window_start, timezone=schedule.timezone
    )
    firing.fired_at = func.now()
    try:
        with session.begin_nested():
            body = render_template(schedule.template, variables)
            if schedule.kind == "batch":
                firing.batch_id = _submit_batch(session, schedule, body)
                fired.batches.append(firing.batch_id)
            else:
                job_id, runnable = _submit_job(session, schedule, firing, body, backfill)
                firing.job_id = job_id
                fired.jobs.extend(runnable)
            firing.status, firing.open = "fired", True
    except (ChatJobsError, ValidationError, ValueError) as exc:
        firing.status, firing.open = "failed", False
        firing.error = {"type": type(exc).__name__, "message": storable(_message(exc))[:2000]}
        schedule.failures += 1
        _maybe_pause(session, schedule)
        log.warning("schedule %s: firing %s failed: %s", schedule.id, firing.scheduled_for, exc)
    fired.firings += 1
    metrics.after_commit(session, "chatjobs_schedule_fires", firing.status)


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"template.{where}: {first['msg']}"
    return str(exc)


def _submit_job(
    session: Session,
    schedule: Schedule,
    firing: ScheduleFiring,
    body: dict[str, Any],
    backfill: bool,
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    if schedule.webhook_url and not body.get("webhook_url"):
        body["webhook_url"] = schedule.webhook_url
    if backfill and "priority" not in body:
        body["priority"] = PRIORITY_BACKFILL
    created = jobs.create_job(
        session=session,
        tenant_id=schedule.tenant_id,
        body=JobCreate.model_validate(body),
        schedule=(schedule.id, firing.scheduled_for),
    )
    return created.job.id, created.runnable


def _submit_batch(session: Session, schedule: Schedule, body: dict[str, Any]) -> str:
    new = batches.NewBatch(
        input_file_id=str(body.get("input_file_id", "")),
        endpoint=body.get("endpoint", batches.ENDPOINT),
        completion_window=body.get("completion_window", "24h"),
        metadata=body.get("metadata"),
        output_expires_seconds=(body.get("output_expires_after") or {}).get("seconds"),
        webhook_url=body.get("webhook_url") or schedule.webhook_url,
    )
    batch, _ = batches.create_batch(session, tenant_id=schedule.tenant_id, new=new)
    return batch.id


def _start(
    session: Session,
    schedule: Schedule,
    scheduled_for: datetime,
    reason: str,
    occupancy: plan.Occupancy,
    fired: Fired,
) -> tuple[plan.Occupancy, bool]:
    """A new firing met by the overlap policy; the occupancy after it, and whether it is a run
    (for max_runs: started, or buffered to start; not skipped, not an instant fired before)."""
    action, after = plan.decide_overlap(schedule.overlap_policy, occupancy)
    status = {plan.OverlapAction.buffer: "buffered", plan.OverlapAction.skip: "skipped"}.get(
        action, "fired"
    )
    firing = _insert_firing(session, schedule, scheduled_for, reason, status)
    if firing is None:
        return occupancy, False
    if action is plan.OverlapAction.cancel_and_start:
        fired.cancelling += _cancel_open(session, schedule)
    if status == "fired":
        _submit(session, schedule, firing, fired, backfill=False)
    return after, status != "skipped"


def _cancel_open(session: Session, schedule: Schedule) -> list[str]:
    """cancel_other: end the jobs of the open firings and move their batches to cancelling;
    returns those batches (their lines are ended once this commits)."""
    cancelling: list[str] = []
    open_firings = session.scalars(
        select(ScheduleFiring).where(
            ScheduleFiring.schedule_id == schedule.id, ScheduleFiring.open.is_(True)
        )
    ).all()
    for firing in open_firings:
        try:
            with session.begin_nested():
                if firing.job_id is not None:
                    jobs.cancel_job(
                        session=session, tenant_id=schedule.tenant_id, job_id=firing.job_id
                    )
                elif firing.batch_id is not None:
                    batch = batches.cancel_batch(
                        session, tenant_id=schedule.tenant_id, batch_id=firing.batch_id
                    )
                    if batch.status == "cancelling":
                        cancelling.append(batch.id)
        except (NotFound, Conflict):
            pass  # it ended meanwhile
        firing.open = False
    return cancelling


def _maybe_pause(session: Session, schedule: Schedule) -> None:
    limit = schedule.pause_after_failures
    if limit is None or schedule.paused or schedule.failures < limit:
        return
    _pause(session, schedule, f"paused after {schedule.failures} failed firings in a row")


def _pause(session: Session, schedule: Schedule, note: str) -> None:
    schedule.paused = True
    schedule.note = note
    session.flush()
    deliveries.queue_schedule_event(session, [schedule.id], "schedule.paused")
    log.warning("schedule %s: %s", schedule.id, schedule.note)


def _settle(session: Session, schedule: Schedule) -> plan.Occupancy:
    """Close the open firings whose job or batch has ended, counting failures; the occupancy."""
    rows = session.execute(
        select(ScheduleFiring, Job.status, Batch.status)
        .outerjoin(Job, Job.id == ScheduleFiring.job_id)
        .outerjoin(Batch, Batch.id == ScheduleFiring.batch_id)
        .where(
            ScheduleFiring.schedule_id == schedule.id,
            ScheduleFiring.open.is_(True) | (ScheduleFiring.status == "buffered"),
        )
        .order_by(ScheduleFiring.scheduled_for)
    ).all()
    active = buffered = 0
    for firing, job_status, batch_status in rows:
        if firing.status == "buffered":
            buffered += 1
            continue
        status = getattr(job_status, "value", job_status) or batch_status
        if status in _JOB_ACTIVE or status in _BATCH_ACTIVE:
            active += 1
            continue
        firing.open = False
        if status in _JOB_FAILED or status in _BATCH_FAILED:
            schedule.failures += 1
            _maybe_pause(session, schedule)
        elif status in ("succeeded", "completed"):
            schedule.failures = 0
    return plan.Occupancy(active=active, buffered=buffered)


def _release(
    session: Session, schedule: Schedule, occupancy: plan.Occupancy, fired: Fired
) -> plan.Occupancy:
    starts, after = plan.release_buffered(occupancy)
    if not starts:
        return occupancy
    firing = session.scalars(
        select(ScheduleFiring)
        .where(ScheduleFiring.schedule_id == schedule.id, ScheduleFiring.status == "buffered")
        .order_by(ScheduleFiring.scheduled_for)
        .limit(1)
    ).one()
    _submit(session, schedule, firing, fired, backfill=False)
    return after


def _advance(
    session: Session, schedule: Schedule, now: datetime, grace: timedelta, fired: Fired
) -> None:
    """One tick's work on one locked schedule (a paused one only settles its firings)."""
    occupancy = _settle(session, schedule)
    if schedule.paused:
        return
    occupancy = _release(session, schedule, occupancy, fired)
    if schedule.next_fire_at is None or schedule.next_fire_at > now:
        return
    due = plan.due_firings(
        expression=schedule.cron,
        timezone=schedule.timezone,
        cursor=schedule.last_scheduled_for or schedule.created_at,
        now=now,
        catchup=schedule.catchup,
        catchup_window=timedelta(seconds=schedule.catchup_window),
        grace=grace,
        start_at=schedule.start_at,
        end_at=schedule.end_at,
        max_runs=schedule.max_runs,
        runs_so_far=schedule.runs,
    )
    for moment in due.missed:
        _insert_firing(session, schedule, moment, "cadence", "missed")
    for moment in due.fire:
        if schedule.paused:
            # Paused by pause_after_failures meanwhile: the rest is not fired (a resume
            # fires from then on, as after any pause).
            break
        occupancy, ran = _start(session, schedule, moment, "cadence", occupancy, fired)
        schedule.runs += ran
    schedule.last_scheduled_for = due.cursor
    # Not due.next_fire_at: the plan counted every time it fired toward max_runs, and some
    # may have been skipped for overlap or fired before by a backfill.
    schedule.next_fire_at = _next_after(schedule, due.cursor)
    schedule.updated_at = func.now()


_LIVE = text(
    """
    SELECT DISTINCT f.schedule_id FROM schedule_firings f
    JOIN schedules s ON s.id = f.schedule_id
    WHERE (f.open OR f.status = 'buffered') AND s.queue = :queue
    LIMIT :limit
    """
)


def tick(*, now: datetime | None = None, grace: timedelta | None = None) -> int:
    """One ticker pass: settle and release every schedule with live firings, then fire every
    due one. Returns the firings made. Safe with any number of tickers at once."""
    moment = _now(now)
    grace = grace or plan.DEFAULT_GRACE
    queue = get_settings().queue_name
    fired = Fired()
    with session_scope() as session:
        live = list(session.scalars(_LIVE, {"queue": queue, "limit": TICK_SCHEDULES}))
        due = (
            select(Schedule.id)
            .where(
                Schedule.queue == queue,
                Schedule.paused.is_(False),
                Schedule.next_fire_at <= moment,
            )
            .order_by(Schedule.next_fire_at)
            .limit(TICK_SCHEDULES)
        )
        ids = sorted(set(live) | set(session.scalars(due)))
        schedules = session.scalars(
            select(Schedule)
            .where(Schedule.id.in_(ids))
            .order_by(Schedule.id)
            .with_for_update(skip_locked=True)
        ).all()
        for schedule in schedules:
            _advance_alone(session, schedule, moment, grace, fired)
    fired.after_commit()
    return fired.firings


def _advance_alone(
    session: Session, schedule: Schedule, now: datetime, grace: timedelta, fired: Fired
) -> None:
    """_advance in a savepoint, so that a schedule it breaks on is left out of this tick
    instead of failing the tick (and every later one) for every schedule on the queue."""
    mine = Fired()
    try:
        with session.begin_nested():
            _advance(session, schedule, now, grace, mine)
    except cron.InvalidSchedule as exc:
        # Stored by a version that took it, or its zone is gone from tzdata: it cannot fire.
        _pause(session, schedule, f"paused: {str(exc)[:500]}")
        return
    except Exception:
        log.exception("schedule %s: the tick broke on it; the next tick tries again", schedule.id)
        return
    fired.add(mine)


def trigger(
    session: Session, *, tenant_id: uuid.UUID, schedule_id: str, now: datetime | None = None
) -> tuple[ScheduleFiring, Fired]:
    """Fire once now, outside the cadence, under the overlap policy (paused or not)."""
    schedule = _locked(session, tenant_id, schedule_id)
    fired = Fired()
    occupancy = _release(session, schedule, _settle(session, schedule), fired)
    moment = _now(now)
    _start(session, schedule, moment, "trigger", occupancy, fired)  # not a run of the cadence
    firing = session.scalars(
        select(ScheduleFiring).where(
            ScheduleFiring.schedule_id == schedule.id, ScheduleFiring.scheduled_for == moment
        )
    ).one()
    return firing, fired


@dataclass(frozen=True)
class Backfilled:
    fired: list[datetime]
    existing: list[datetime]


def backfill(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    schedule_id: str,
    start: datetime,
    end: datetime,
    now: datetime | None = None,
) -> tuple[Backfilled, Fired]:
    """Fire each nominal instant in [start, end] that has no firing yet (at the backfill
    priority); an instant fired before, by the cadence or an earlier backfill, is left as it
    is. The range must be in the past and hold at most MAX_BACKFILL instants."""
    moment = _now(now)
    if start.tzinfo is None or end.tzinfo is None:
        raise InvalidRequest("start and end must carry a time zone", param="start")
    if end < start:
        raise InvalidRequest("end must not be before start", param="end")
    if end > moment:
        raise InvalidRequest("end must not be in the future: backfill is for the past", param="end")
    schedule = _locked(session, tenant_id, schedule_id)
    instants = list(
        cron.fires_between(
            schedule.cron,
            schedule.timezone,
            start,
            end + timedelta(microseconds=1),
            MAX_BACKFILL + 1,
        )
    )
    if len(instants) > MAX_BACKFILL:
        raise InvalidRequest(
            f"the range holds more than {MAX_BACKFILL} firings; backfill it in parts",
            param="end",
        )
    fired = Fired()
    done: list[datetime] = []
    existing: list[datetime] = []
    for instant in instants:
        firing = _insert_firing(session, schedule, instant, "backfill", "fired")
        if firing is None:
            existing.append(instant)
            continue
        _submit(session, schedule, firing, fired, backfill=True)
        done.append(instant)
    return Backfilled(done, existing), fired
