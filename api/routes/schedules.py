"""/v1/schedules: cron schedules that fire a job or a batch, their firings, trigger and backfill.

The bodies are judged here, before chatjobs.schedules.service stores anything: a template is
validated as the body it stands for (POST /v1/jobs or POST /v1/batches), so a schedule that
could never fire is a 422 naming the place (``template.request.temperature``), not a failed
firing hours later.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import TenantDep
from api.openapi import V1_ERRORS, errors
from api.routes.batches import BatchCreate
from chatjobs import files, ssrf
from chatjobs.batches import service as batches
from chatjobs.db import session_scope
from chatjobs.errors import InvalidRequest, NotFound
from chatjobs.models import Batch, Job, Schedule, ScheduleFiring
from chatjobs.schedules import cron, plan, service
from chatjobs.schedules.template import check_template_variables
from chatjobs.schemas import JobCreate, refuse_unstorable
from chatjobs.settings import get_settings
from chatjobs.storable import MAX_DEPTH

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], responses=V1_ERRORS)

# Instants a schedule or a backfill may name: cron arithmetic 50 years on from the latest
# stays inside datetime's range, and nothing fires before the epoch.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
INT4_MAX = 2**31 - 1  # max_runs and pause_after_failures are int4 columns


def _invalid(loc: Sequence[str | int], rule: str, message: str) -> RequestValidationError:
    """A 422 naming ``loc`` in the body, in the shape every validation error has."""
    return RequestValidationError([{"type": rule, "loc": ("body", *loc), "msg": message}])


def _rule(exc: cron.InvalidSchedule) -> ValueError:
    # The messages start with their field ("cron: ..."); the 422 names the field already.
    return ValueError(exc.message.removeprefix(f"{exc.field}: "))


def _judged_by(check: Callable[[str], object]) -> AfterValidator:
    """A field validator running ``check`` (cron.parse_cron, cron.check_timezone): the
    InvalidSchedule it raises is the field's 422."""

    def validate(value: str) -> str:
        try:
            check(value)
        except cron.InvalidSchedule as exc:
            raise _rule(exc) from None
        return value

    return AfterValidator(validate)


def _instant(value: datetime) -> datetime:
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        value = LATEST
    if not EARLIEST <= value < LATEST:
        raise ValueError("must be between 1970-01-01T00:00:00Z and 9000-01-01T00:00:00Z")
    return value


def _webhook_target(value: str) -> str:
    # Literal addresses are judged now; hostnames after DNS, at each delivery (as for jobs).
    ssrf.check_literal(value, ssrf.parse_allowlist(get_settings().webhook_allow_private))
    return value


Instant = Annotated[
    AwareDatetime,
    AfterValidator(_instant),
    Field(description="RFC 3339 with a zone, e.g. 2026-10-25T07:00:00+01:00"),
]
Count = Annotated[int, Field(ge=1, le=INT4_MAX, strict=True)]


class _Body(BaseModel):
    """What create and update bodies share: storable values and an ordered window."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        # NUL, lone surrogates, NaN or nesting deeper than jobs allow, anywhere but the
        # template (judged as the job or batch body it is), is a 422 naming its place.
        if isinstance(data, dict):
            rest = {key: value for key, value in data.items() if key != "template"}
            refuse_unstorable(rest, title=cls.__name__, max_depth=MAX_DEPTH + 1)
        return data

    @field_validator("end_at", check_fields=False)
    @classmethod
    def _window(cls, end: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start_at")
        if start is not None and end is not None and end <= start:
            raise ValueError("end_at must be after start_at")
        return end


class ScheduleCreate(_Body):
    """The body of POST /v1/schedules."""

    cron: Annotated[
        str,
        Field(
            min_length=1,
            max_length=cron.MAX_EXPRESSION_LENGTH,
            description="5 fields (minute hour day-of-month month day-of-week) or @hourly, "
            "@daily, @weekly, @monthly, @yearly; DST as cron(8)",
        ),
        _judged_by(cron.parse_cron),
    ]
    timezone: Annotated[
        str,
        Field(min_length=1, max_length=64, description="IANA zone"),
        _judged_by(cron.check_timezone),
    ] = "UTC"
    start_at: Instant | None = None
    end_at: Instant | None = None
    paused: StrictBool = False
    note: Annotated[str, Field(max_length=1000)] | None = None
    template: Annotated[
        dict[str, Any],
        Field(
            min_length=1,
            description="what each firing submits: a POST /v1/jobs body (with `request`; no "
            "`deadline`) or a POST /v1/batches body (with `input_file_id`). Message contents "
            "and metadata may use {{scheduled_for}}, {{window_start}}, {{window_end}}, "
            "{{date}}, {{yesterday}}",
        ),
    ]
    overlap_policy: plan.OverlapPolicy = plan.DEFAULT_OVERLAP
    catchup_window: Annotated[
        int, Field(ge=0, le=31_536_000, strict=True, description="seconds")
    ] = int(plan.DEFAULT_CATCHUP_WINDOW.total_seconds())
    catchup: plan.Catchup = plan.DEFAULT_CATCHUP
    max_runs: Count | None = None
    pause_after_failures: Count | None = None
    webhook_url: (
        Annotated[
            str, Field(max_length=2048, pattern=r"^https?://"), AfterValidator(_webhook_target)
        ]
        | None
    ) = Field(default=None, description="for the fired jobs or batches without their own")
    metadata: dict[str, Any] | None = None


# Every field of the create body, each optional: a field sent replaces the stored value (null
# clears a nullable one), a field left out keeps it. A field's default is not validated, so
# "absent" is None while an explicit null for a non-nullable field is refused.
_OPTIONAL: dict[str, Any] = {
    name: (
        Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation,
        Field(default=None, description=field.description),
    )
    for name, field in ScheduleCreate.model_fields.items()
}
ScheduleUpdate = create_model(
    "ScheduleUpdate",
    __base__=_Body,
    __doc__="The body of PATCH /v1/schedules/{id}: any subset of the create fields.",
    **_OPTIONAL,
)


class Backfill(BaseModel):
    """The body of POST /v1/schedules/{id}/backfill: a past range, both ends included."""

    model_config = ConfigDict(extra="forbid")

    start: Instant
    end: Instant

    @field_validator("end")
    @classmethod
    def _past_range(cls, end: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("start")
        if start is not None and end < start:
            raise ValueError("end must not be before start")
        if end > datetime.now(UTC):
            raise ValueError("end must not be in the future: backfill is for the past")
        return end


def _template(session: Session, tenant_id: uuid.UUID, template: dict[str, Any]) -> str:
    """The template's kind once it validates as the body it stands for; else a 422."""
    model: type[BaseModel]
    if "request" in template:
        if "deadline" in template:
            raise _invalid(
                ("template", "deadline"),
                "recurring",
                "an absolute deadline cannot recur; leave it out of a schedule's template",
            )
        kind, model = "job", JobCreate
    elif "input_file_id" in template:
        kind, model = "batch", BatchCreate
    else:
        raise _invalid(
            ("template",),
            "template_kind",
            "must be a job body (with `request`) or a batch body (with `input_file_id`)",
        )
    try:
        body = model.model_validate(template)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", "template", *e["loc"])} for e in exc.errors()]
        ) from None
    if isinstance(body, BatchCreate):
        _check_batch(session, tenant_id, body)
    try:
        check_template_variables(template)
    except cron.InvalidSchedule as exc:
        raise _invalid(("template",), "unknown_variable", str(_rule(exc))) from None
    return kind


def _check_batch(session: Session, tenant_id: uuid.UUID, body: BatchCreate) -> None:
    """What POST /v1/batches would refuse of this body, judged now rather than at each firing."""
    if body.endpoint != batches.ENDPOINT:
        raise _invalid(("template", "endpoint"), "endpoint", f"must be {batches.ENDPOINT}")
    try:
        batches.window_seconds(body.completion_window)
        source = files.get_file(session, tenant_id=tenant_id, file_id=body.input_file_id)
    except InvalidRequest as exc:
        raise _invalid(("template", "completion_window"), "window", exc.message) from None
    except NotFound:
        raise _invalid(
            ("template", "input_file_id"), "not_found", f"no file {body.input_file_id}"
        ) from None
    if source.purpose != "batch":
        raise _invalid(
            ("template", "input_file_id"), "purpose", "must name a file with purpose 'batch'"
        )


# --- read shapes --------------------------------------------------------------------------


class FireTime(BaseModel):
    utc: datetime
    local: str = Field(description="ISO 8601 with the schedule zone's offset at that instant")


class ScheduleObject(BaseModel):
    id: str
    object: Literal["schedule"] = "schedule"
    cron: str
    timezone: str
    start_at: datetime | None
    end_at: datetime | None
    paused: bool
    note: str | None
    kind: Literal["job", "batch"]
    template: dict[str, Any]
    overlap_policy: str
    catchup: str
    catchup_window: int
    max_runs: int | None
    runs: int
    pause_after_failures: int | None
    failures: int
    webhook_url: str | None
    metadata: dict[str, Any] | None
    next_fire_times: list[FireTime] = Field(description="the next 5 (none while paused)")
    last_scheduled_for: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, schedule: Schedule) -> ScheduleObject:
        try:
            zone = ZoneInfo(schedule.timezone)
            times = service.next_fire_times(schedule)
        except (cron.InvalidSchedule, ValueError):
            times = []  # a stored row always reads, whatever tzdata became since
        return cls(
            **{name: getattr(schedule, name) for name in _STORED},
            metadata=schedule.metadata_,
            next_fire_times=[
                FireTime(utc=moment, local=moment.astimezone(zone).isoformat()) for moment in times
            ],
        )


_STORED = tuple(
    name
    for name in ScheduleObject.model_fields
    if name not in ("object", "metadata", "next_fire_times")
)


class ScheduleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScheduleObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FiringObject(BaseModel):
    id: uuid.UUID
    scheduled_for: datetime = Field(description="the nominal instant (UTC)")
    reason: Literal["cadence", "catchup", "trigger", "backfill"]
    status: Literal["fired", "buffered", "skipped", "missed", "failed"]
    outcome: str = Field(description="the fired job's or batch's status, else the status")
    job_id: uuid.UUID | None
    batch_id: str | None
    error: dict[str, Any] | None
    created_at: datetime
    fired_at: datetime | None

    @classmethod
    def of(cls, read: service.FiringRead) -> FiringObject:
        firing = read.firing
        return cls(**{name: getattr(firing, name) for name in _FIRING_STORED}, outcome=read.outcome)


_FIRING_STORED = tuple(name for name in FiringObject.model_fields if name != "outcome")


class FiringList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FiringObject]
    first_id: uuid.UUID | None
    last_id: uuid.UUID | None
    has_more: bool


class Backfilled(BaseModel):
    fired: list[datetime] = Field(description="instants fired by this call")
    existing: list[datetime] = Field(description="instants that had a firing already")


# --- routes -------------------------------------------------------------------------------

SCHEDULE_EXAMPLE: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {
                "examples": {
                    "nightly": {
                        "summary": "summarise yesterday's tickets at 07:00 in Berlin",
                        "value": {
                            "cron": "0 7 * * *",
                            "timezone": "Europe/Berlin",
                            "template": {
                                "request": {
                                    "model": "gpt-4.1",
                                    "messages": [
                                        {
                                            "role": "user",
                                            "content": "Summarise the tickets of {{yesterday}}.",
                                        }
                                    ],
                                },
                                "metadata": {"day": "{{date}}"},
                            },
                        },
                    }
                }
            }
        }
    }
}


def _page(
    data: Sequence[ScheduleObject] | Sequence[FiringObject], has_more: bool
) -> dict[str, Any]:
    """A cursor page's fields: the next request names ``last_id`` as ``after``."""
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }


def _firing(session: Session, firing: ScheduleFiring) -> FiringObject:
    """A firing just made, with its outcome as GET .../firings shows it."""
    job = session.scalar(select(Job.status).where(Job.id == firing.job_id))
    batch = session.scalar(select(Batch.status).where(Batch.id == firing.batch_id))
    outcome = service.outcome(firing.status, job, batch)
    return FiringObject.of(service.FiringRead(firing, outcome))


@router.post(
    "",
    status_code=201,
    response_model=ScheduleObject,
    responses=errors(400, 409, 413, 422),
    openapi_extra=SCHEDULE_EXAMPLE,
)
def create_schedule(body: ScheduleCreate, tenant_id: TenantDep) -> ScheduleObject:
    """Store a schedule (201); it fires from its first nominal time after now (or start_at).
    `next_fire_times` shows the next five in UTC and in the schedule's zone."""
    with session_scope() as session:
        kind = _template(session, tenant_id, body.template)
        spec = service.Spec(**body.model_dump(), kind=kind)
        schedule = service.create_schedule(session, tenant_id=tenant_id, spec=spec)
        return ScheduleObject.of(schedule)


@router.get("", response_model=ScheduleList)
def list_schedules(
    tenant_id: TenantDep,
    after: Annotated[
        str | None,
        Query(pattern=r"^sched_[0-9a-f]{32}$", description="last id of the previous page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ScheduleList:
    """The tenant's schedules, newest first, with cursor pagination."""
    with session_scope() as session:
        page, has_more = service.list_schedules(
            session, tenant_id=tenant_id, after=after, limit=limit
        )
        data = [ScheduleObject.of(schedule) for schedule in page]
    return ScheduleList(**_page(data, has_more))


@router.get("/{schedule_id}", response_model=ScheduleObject, responses=errors(404))
def get_schedule(schedule_id: str, tenant_id: TenantDep) -> ScheduleObject:
    """One schedule, with its next fire times."""
    with session_scope() as session:
        return ScheduleObject.of(
            service.get_schedule(session, tenant_id=tenant_id, schedule_id=schedule_id)
        )


@router.patch("/{schedule_id}", response_model=ScheduleObject, responses=errors(400, 404, 413, 422))
def update_schedule(
    schedule_id: str,
    body: ScheduleUpdate,
    tenant_id: TenantDep,
) -> ScheduleObject:
    """Change any of the create fields. `{"paused": true, "note": "..."}` pauses;
    `{"paused": false}` resumes from now (times that passed while paused are not fired); a
    new cron, zone or start_at also counts from now."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    with session_scope() as session:
        current = service.get_schedule(session, tenant_id=tenant_id, schedule_id=schedule_id)
        if "template" in changes:
            changes["kind"] = _template(session, tenant_id, changes["template"])
        start = changes.get("start_at", current.start_at)
        end = changes.get("end_at", current.end_at)
        if start is not None and end is not None and end <= start:
            raise _invalid(("end_at",), "value_error", "end_at must be after start_at")
        schedule = service.update_schedule(
            session, tenant_id=tenant_id, schedule_id=schedule_id, changes=changes
        )
        return ScheduleObject.of(schedule)


@router.delete("/{schedule_id}", status_code=204, responses=errors(404))
def delete_schedule(schedule_id: str, tenant_id: TenantDep) -> Response:
    """Delete the schedule and its firings; the jobs and batches it fired stay."""
    with session_scope() as session:
        service.delete_schedule(session, tenant_id=tenant_id, schedule_id=schedule_id)
    return Response(status_code=204)


@router.post(
    "/{schedule_id}/trigger",
    status_code=201,
    response_model=FiringObject,
    responses=errors(404, 413),
)
def trigger_schedule(schedule_id: str, tenant_id: TenantDep) -> FiringObject:
    """Fire once now, outside the cadence, under the overlap policy (paused or not): 201
    with the firing (`skipped` or `buffered` if the policy says so)."""
    with session_scope() as session:
        firing, fired = service.trigger(session, tenant_id=tenant_id, schedule_id=schedule_id)
        read = _firing(session, firing)
    fired.after_commit()
    return read


@router.post(
    "/{schedule_id}/backfill",
    response_model=Backfilled,
    responses=errors(
        400,
        404,
        413,
        422,
        described={400: "The range holds more than 1000 nominal times (`invalid_request_error`)."},
    ),
)
def backfill_schedule(schedule_id: str, body: Backfill, tenant_id: TenantDep) -> Backfilled:
    """Fire every nominal time in [start, end] that has no firing yet, at the backfill
    priority; `existing` lists the ones fired before (a repeated call fires nothing)."""
    with session_scope() as session:
        done, fired = service.backfill(
            session, tenant_id=tenant_id, schedule_id=schedule_id, start=body.start, end=body.end
        )
    fired.after_commit()
    return Backfilled(fired=done.fired, existing=done.existing)


@router.get("/{schedule_id}/firings", response_model=FiringList, responses=errors(404))
def list_firings(
    schedule_id: str,
    tenant_id: TenantDep,
    after: Annotated[uuid.UUID | None, Query(description="last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FiringList:
    """The schedule's firings, latest nominal time first, each with its job or batch and
    what came of it (`outcome`)."""
    with session_scope() as session:
        page, has_more = service.list_firings(
            session, tenant_id=tenant_id, schedule_id=schedule_id, after=after, limit=limit
        )
        data = [FiringObject.of(read) for read in page]
    return FiringList(**_page(data, has_more))
