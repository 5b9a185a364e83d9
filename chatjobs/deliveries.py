"""Webhook deliveries: the only writer of delivery state, and the tenants' signing secrets.

A job or a batch that ends with a webhook_url, or a schedule with one that pauses itself, gets
one delivery row in the same transaction, so an event is never lost; a delivery is about one of
them (``job_id``, ``batch_id`` or ``schedule_id``, the others NULL). The dispatcher publishes
due deliveries; each attempt is fenced like a job claim and logged.

A receiver that answers 410 disables its URL for the tenant (``webhook_disabled_urls``): the
deliveries waiting for it end ``gone``, later events to it are recorded ``gone`` and never
sent, until the tenant enables the URL again.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    SQLColumnExpression,
    Text,
    and_,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs import db
from chatjobs.errors import (
    DeliveryInProgress,
    DeliveryNotFound,
    DisabledUrlNotFound,
    WebhookUrlDisabled,
)
from chatjobs.models import (
    Batch,
    DeliveryStatus,
    Job,
    Schedule,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDisabledUrl,
    WebhookSecret,
)
from chatjobs.settings import get_settings
from chatjobs.webhooks import DeliveryResult, new_secret

_DISABLED = "not sent: this URL answered 410 and is disabled (POST /v1/webhooks/enable)"
_STATUS_TYPE = WebhookDelivery.__table__.c.status.type
BATCH_EVENTS = frozenset({"batch.completed", "batch.failed", "batch.expired", "batch.cancelled"})
SCHEDULE_EVENTS = ("schedule.paused",)


def queue_events(session: Session, job_ids: Iterable[uuid.UUID], event_type: str) -> None:
    """Record one delivery per job that asked for a webhook; the same event only once.

    An event for a URL the tenant has disabled is recorded ``gone`` and never published.
    """
    _queue(
        session,
        Job,
        list(job_ids),
        event_type,
        key="job_id",
        queue=Job.queue,
        constraint="uq_webhook_deliveries_job_event",
    )


def queue_batch_event(session: Session, batch_ids: Iterable[str], event_type: str) -> None:
    """Record one delivery per batch that asked for a webhook; the same event only once.

    Called in the transaction that ends the batch, with one of ``BATCH_EVENTS``. The worker
    sends OpenAI's event shape (``{"id": "evt_...", "object": "event", "type", "created_at",
    "data": {"id": batch_id}}``). A disabled URL is recorded ``gone``, as for jobs.
    """
    if event_type not in BATCH_EVENTS:
        raise ValueError(f"unknown batch event {event_type!r}")
    _queue(
        session,
        Batch,
        list(batch_ids),
        event_type,
        key="batch_id",
        # A batch has no queue of its own: every process of a deployment, whichever ends
        # the batch, serves one queue, and that deployment's dispatcher publishes it.
        queue=literal(get_settings().queue_name),
        constraint="uq_webhook_deliveries_batch_event",
    )


def queue_schedule_event(session: Session, schedule_ids: Iterable[str], event_type: str) -> None:
    """Record one delivery per schedule that has a webhook_url; every call is a new event.

    Called in the transaction that pauses the schedule, with one of ``SCHEDULE_EVENTS``. A
    schedule may be paused, resumed and paused again: each pause is its own event, so nothing
    makes a second one a duplicate. The worker sends ``{"id": "evt_...", "object": "event",
    "type", "created_at", "data": {"id", "paused", "note", "failures"}}``. A disabled URL is
    recorded ``gone``, as for jobs.
    """
    if event_type not in SCHEDULE_EVENTS:
        raise ValueError(f"unknown schedule event {event_type!r}")
    _queue(
        session,
        Schedule,
        list(schedule_ids),
        event_type,
        key="schedule_id",
        queue=Schedule.queue,
    )


def _queue(
    session: Session,
    subject: type[Job] | type[Batch] | type[Schedule],
    ids: list[uuid.UUID] | list[str],
    event_type: str,
    *,
    key: str,
    queue: SQLColumnExpression[str],
    constraint: str | None = None,
) -> None:
    # One INSERT ... SELECT for jobs, batches and schedules: ``key`` is the delivery column
    # that holds the subject's id; ``constraint``, where given, makes the event idempotent per
    # subject (a schedule's events repeat, so it has none).
    if not ids:
        return
    disabled = WebhookDisabledUrl.url.is_not(None)
    rows = (
        select(
            # Ids from SQL: Python-side defaults would be computed once for every row of the
            # INSERT ... SELECT. Deliveries are ordered by created_at, never paged by id.
            func.gen_random_uuid(),
            literal(0),
            subject.tenant_id,
            subject.id,
            queue,
            literal(event_type),
            func.concat("msg_", func.replace(cast(func.gen_random_uuid(), Text), "-", "")),
            subject.webhook_url,
            case((disabled, None), else_=func.now()),
            cast(
                case((disabled, DeliveryStatus.gone.value), else_=DeliveryStatus.pending.value),
                _STATUS_TYPE,
            ),
            case((disabled, _DISABLED), else_=None),
        )
        .outerjoin(
            WebhookDisabledUrl,
            and_(
                WebhookDisabledUrl.tenant_id == subject.tenant_id,
                WebhookDisabledUrl.url == subject.webhook_url,
            ),
        )
        .where(subject.id.in_(ids), subject.webhook_url.is_not(None))
    )
    columns = ["id", "attempts", "tenant_id", key, "queue", "event_type", "msg_id", "url"]
    statement = insert(WebhookDelivery).from_select(
        [*columns, "next_attempt_at", "status", "last_error"], rows, include_defaults=False
    )
    if constraint is not None:
        statement = statement.on_conflict_do_nothing(constraint=constraint)
    session.execute(statement)


def _url_disabled() -> ColumnElement[bool]:
    """True for a delivery whose URL its tenant has disabled (correlated to the row)."""
    return exists().where(
        WebhookDisabledUrl.tenant_id == WebhookDelivery.tenant_id,
        WebhookDisabledUrl.url == WebhookDelivery.url,
    )


def take_due(session: Session, limit: int = 1000) -> list[uuid.UUID]:
    """Claim the right to publish due deliveries (SKIP LOCKED, like jobs)."""
    return db.take_due(
        session,
        WebhookDelivery,
        WebhookDelivery.queue == get_settings().queue_name,
        WebhookDelivery.status == DeliveryStatus.pending,
        limit=limit,
    )


@dataclass(frozen=True)
class Claimed:
    """A delivery taken for one attempt: about a job, a batch or a schedule (exactly one of
    ``job_id``, ``batch_id`` and ``schedule_id`` is set)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID | None
    batch_id: str | None
    schedule_id: str | None
    event_type: str
    msg_id: str
    url: str
    payload: str | None
    attempts: int
    # When the event was recorded: in the transaction that ended its job or batch, or that
    # paused its schedule.
    created_at: datetime


def skip_if_disabled(session: Session, delivery_id: uuid.UUID) -> bool:
    """Mark a pending delivery ``gone`` without sending it if its URL was disabled since it
    was recorded; True if it was."""
    skipped = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.pending,
            _url_disabled(),
        )
        .values(
            status=DeliveryStatus.gone,
            next_attempt_at=None,
            last_error=_DISABLED,
            updated_at=func.now(),
        )
        .returning(WebhookDelivery.id)
    ).one_or_none()
    return skipped is not None


def claim(session: Session, delivery_id: uuid.UUID) -> Claimed | None:
    """Take one pending delivery for an attempt; None if another worker has it, it is done,
    or its URL is disabled (``skip_if_disabled`` then records it)."""
    lease = timedelta(seconds=get_settings().webhook_timeout_seconds * 4)
    row = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.pending,
            ~_url_disabled(),
        )
        .values(
            status=DeliveryStatus.delivering,
            attempts=WebhookDelivery.attempts + 1,
            lease_expires_at=func.now() + lease,
            updated_at=func.now(),
        )
        .returning(
            WebhookDelivery.id,
            WebhookDelivery.tenant_id,
            WebhookDelivery.job_id,
            WebhookDelivery.batch_id,
            WebhookDelivery.schedule_id,
            WebhookDelivery.event_type,
            WebhookDelivery.msg_id,
            WebhookDelivery.url,
            WebhookDelivery.payload,
            WebhookDelivery.attempts,
            WebhookDelivery.created_at,
        )
    ).one_or_none()
    if row is None:
        return None
    return Claimed(**row._mapping)


def store_payload(session: Session, delivery_id: uuid.UUID, payload: str) -> None:
    """Fix the body at the first attempt: every retry sends the same bytes."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.payload.is_(None))
        .values(payload=payload)
    )


def retry_schedule() -> list[float]:
    raw = get_settings().webhook_retry_schedule
    return [float(x) for x in raw.split(",") if x.strip()]


def record_attempt(session: Session, claimed: Claimed, result: DeliveryResult) -> DeliveryStatus:
    """Log the attempt and move the delivery on: done, gone, blocked, retry later, or failed."""
    session.add(
        WebhookAttempt(
            delivery_id=claimed.id,
            attempt=claimed.attempts,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error,
            blocked=result.blocked,
        )
    )
    schedule = retry_schedule()
    values: dict[str, object] = {
        "last_status_code": result.status_code,
        "last_error": result.error,
        "lease_expires_at": None,
        "updated_at": func.now(),
    }
    if result.ok:
        status = DeliveryStatus.succeeded
        values["delivered_at"] = func.now()
    elif result.gone:
        status = DeliveryStatus.gone
    elif result.blocked:
        status = DeliveryStatus.blocked
    elif claimed.attempts < len(schedule):
        status = DeliveryStatus.pending
        delay = max(schedule[claimed.attempts], result.retry_after or 0.0)
        values["next_attempt_at"] = func.now() + timedelta(seconds=delay)
    else:
        status = DeliveryStatus.failed
    values["status"] = status
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.id,
            WebhookDelivery.status == DeliveryStatus.delivering,
            WebhookDelivery.attempts == claimed.attempts,
        )
        .values(**values)
    )
    if status == DeliveryStatus.gone:
        _disable_url(session, claimed, result)
    session.flush()
    return status


def _disable_url(session: Session, claimed: Claimed, result: DeliveryResult) -> None:
    # 410 means the receiver is gone: nothing more goes to that URL, queued or future.
    session.execute(
        insert(WebhookDisabledUrl)
        .values(
            tenant_id=claimed.tenant_id,
            url_sha256=_url_key(claimed.url),
            url=claimed.url,
            status_code=result.status_code,
            reason=result.error or f"receiver answered {result.status_code}",
            webhook_id=claimed.msg_id,
        )
        .on_conflict_do_nothing()
    )
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.tenant_id == claimed.tenant_id,
            WebhookDelivery.url == claimed.url,
            WebhookDelivery.status == DeliveryStatus.pending,
        )
        .values(
            status=DeliveryStatus.gone,
            next_attempt_at=None,
            updated_at=func.now(),
            last_error=_DISABLED,
        )
    )


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def disabled_urls(session: Session, tenant_id: uuid.UUID) -> list[WebhookDisabledUrl]:
    """The tenant's disabled webhook URLs, most recently disabled first."""
    return list(
        session.scalars(
            select(WebhookDisabledUrl)
            .where(WebhookDisabledUrl.tenant_id == tenant_id)
            .order_by(WebhookDisabledUrl.disabled_at.desc())
        )
    )


def enable_url(session: Session, tenant_id: uuid.UUID, url: str) -> WebhookDisabledUrl:
    """Deliver to a disabled URL again (later events; earlier ones only if redelivered)."""
    row = session.scalars(
        delete(WebhookDisabledUrl)
        .where(
            WebhookDisabledUrl.tenant_id == tenant_id,
            WebhookDisabledUrl.url_sha256 == _url_key(url),
            WebhookDisabledUrl.url == url,
        )
        .returning(WebhookDisabledUrl)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        raise DisabledUrlNotFound(f"webhook URL {url!r} is not disabled")
    return row


def reconcile(session: Session) -> int:
    """Deliveries whose worker died mid-attempt, or whose message was lost, become due."""
    stale = func.now() - timedelta(seconds=get_settings().stale_queued_seconds)
    rows = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.queue == get_settings().queue_name,
            (
                (WebhookDelivery.status == DeliveryStatus.delivering)
                & (WebhookDelivery.lease_expires_at < func.now())
            )
            | (
                (WebhookDelivery.status == DeliveryStatus.pending)
                & WebhookDelivery.next_attempt_at.is_(None)
                & (WebhookDelivery.updated_at < stale)
            ),
        )
        .values(
            status=DeliveryStatus.pending,
            next_attempt_at=func.now(),
            lease_expires_at=None,
            updated_at=func.now(),
        )
        .returning(WebhookDelivery.id)
    ).all()
    return len(rows)


def list_for_job(
    session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID
) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at)
        )
    )


def attempts_for(session: Session, delivery_ids: list[uuid.UUID]) -> list[WebhookAttempt]:
    return list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(delivery_ids))
            .order_by(WebhookAttempt.id)
        )
    )


def redeliver(
    session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, delivery_id: uuid.UUID
) -> WebhookDelivery:
    """Send a delivery again, under the same webhook-id, whatever became of it.

    DeliveryInProgress while an attempt runs; WebhookUrlDisabled while its URL is disabled.
    """
    mine = (
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.tenant_id == tenant_id,
        WebhookDelivery.job_id == job_id,
    )
    row = session.scalars(
        update(WebhookDelivery)
        .where(*mine, WebhookDelivery.status != DeliveryStatus.delivering, ~_url_disabled())
        .values(status=DeliveryStatus.pending, next_attempt_at=func.now(), updated_at=func.now())
        .returning(WebhookDelivery)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is not None:
        return row
    # Why not: one more read, on this rare path only.
    found = session.execute(
        select(WebhookDelivery.status, WebhookDelivery.url).where(*mine)
    ).one_or_none()
    if found is None:
        raise DeliveryNotFound(f"no delivery {delivery_id} for job {job_id}")
    if found.status == DeliveryStatus.delivering:
        raise DeliveryInProgress(
            f"delivery {delivery_id} is delivering (an attempt is in flight); "
            "redeliver it once that attempt ends"
        )
    raise WebhookUrlDisabled(
        f"delivery {delivery_id} goes to a disabled URL (it answered 410); "
        "POST /v1/webhooks/enable first"
    )


# --- signing secrets -------------------------------------------------------------------


def active_secrets(session: Session, tenant_id: uuid.UUID) -> list[WebhookSecret]:
    """The tenant's secrets in force, newest first; one is created on first use."""
    rows = list(
        session.scalars(
            select(WebhookSecret)
            .where(
                WebhookSecret.tenant_id == tenant_id,
                (WebhookSecret.expires_at.is_(None)) | (WebhookSecret.expires_at > func.now()),
            )
            .order_by(WebhookSecret.created_at.desc())
        )
    )
    if rows:
        return rows
    secret = WebhookSecret(tenant_id=tenant_id, secret=new_secret())
    session.add(secret)
    session.flush()
    return [secret]


def rotate_secret(
    session: Session, tenant_id: uuid.UUID, overlap_seconds: float
) -> list[WebhookSecret]:
    """Add a new secret; the old ones stay valid (both signatures sent) for the overlap."""
    active_secrets(session, tenant_id)
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None))
        .values(expires_at=func.now() + timedelta(seconds=overlap_seconds))
    )
    session.add(WebhookSecret(tenant_id=tenant_id, secret=new_secret()))
    session.flush()
    return active_secrets(session, tenant_id)
