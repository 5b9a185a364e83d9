"""One webhook delivery attempt: claim, fix the body, sign, POST to the checked address, log.

A job's event carries the job as ``GET /v1/jobs/{id}`` shows it; a batch's event is OpenAI's
(``batch.completed`` and the others), so the official SDK's ``webhooks.unwrap`` verifies and
parses it; a schedule's event (``schedule.paused``) has the same envelope as a batch's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from chatjobs import deliveries, jobs, metrics, ssrf, webhooks
from chatjobs.db import session_scope
from chatjobs.models import DeliveryStatus, Schedule
from chatjobs.schemas import JobRead
from chatjobs.settings import get_settings

log = logging.getLogger("chatjobs.webhooks")
_local = threading.local()


@lru_cache
def allowlist() -> tuple[ssrf.IPNetwork, ...]:
    return ssrf.parse_allowlist(get_settings().webhook_allow_private)


def _client() -> httpx.Client:
    # One client per thread: deliveries to untrusted receivers share no connection state.
    client = getattr(_local, "client", None)
    if client is None:
        client = webhooks.build_client(timeout=get_settings().webhook_timeout_seconds)
        _local.client = client
    return client


def deliver(delivery_id: uuid.UUID) -> str:
    """Make one attempt at a delivery; returns its new status (or "skipped")."""
    with session_scope() as session:
        if deliveries.skip_if_disabled(session, delivery_id):
            log.info("webhook delivery=%s status=gone: its URL is disabled, not sent", delivery_id)
            metrics.inc("chatjobs_webhook_deliveries", DeliveryStatus.gone.value)
            return DeliveryStatus.gone.value
        claimed = deliveries.claim(session, delivery_id)
        if claimed is None:
            return "skipped"
        payload = claimed.payload
        if payload is None:
            payload = _payload(session, claimed)
            deliveries.store_payload(session, claimed.id, payload)
        secrets = [s.secret for s in deliveries.active_secrets(session, claimed.tenant_id)]
    body = payload.encode()
    headers = webhooks.build_headers(claimed.msg_id, int(time.time()), body, secrets)
    result = webhooks.deliver(
        claimed.url,
        body,
        headers,
        allow=allowlist(),
        timeout=get_settings().webhook_timeout_seconds,
        client=_client(),
    )
    with session_scope() as session:
        status = deliveries.record_attempt(session, claimed, result)
    # An attempt that failed with attempts left leaves the delivery pending: a retry.
    outcome = "retry" if status == DeliveryStatus.pending else status.value
    metrics.inc("chatjobs_webhook_deliveries", outcome)
    level = logging.WARNING if status == DeliveryStatus.blocked else logging.INFO
    log.log(
        level,
        "webhook delivery=%s %s event=%s attempt=%d status=%s http=%s latency_ms=%d error=%s",
        claimed.id,
        _subject(claimed),
        claimed.event_type,
        claimed.attempts,
        status.value,
        result.status_code,
        result.latency_ms,
        result.error,
    )
    return status.value


def _subject(claimed: deliveries.Claimed) -> str:
    """What a delivery is about, for its log line: ``job=``, ``batch=`` or ``schedule=``."""
    if claimed.batch_id is not None:
        return f"batch={claimed.batch_id}"
    if claimed.schedule_id is not None:
        return f"schedule={claimed.schedule_id}"
    return f"job={claimed.job_id}"


def _payload(session: Session, claimed: deliveries.Claimed) -> str:
    """The body of a delivery's first attempt (stored: retries resend the same bytes)."""
    # One event per delivery, dated when it was recorded: when the batch ended or the
    # schedule paused.
    event_id, created_at = f"evt_{claimed.id.hex}", claimed.created_at
    if claimed.batch_id is not None:
        return batch_event(
            claimed.event_type, claimed.batch_id, event_id=event_id, created_at=created_at
        )
    if claimed.schedule_id is not None:
        # The schedule cannot be gone: deleting it deletes its deliveries (ON DELETE CASCADE).
        note, failures = session.execute(
            select(Schedule.note, Schedule.failures).where(Schedule.id == claimed.schedule_id)
        ).one()
        return schedule_event(
            claimed.event_type,
            claimed.schedule_id,
            note=note,
            failures=failures,
            event_id=event_id,
            created_at=created_at,
        )
    assert claimed.job_id is not None  # a delivery is about a job, a batch or a schedule
    job = jobs.get_job(session=session, tenant_id=claimed.tenant_id, job_id=claimed.job_id)
    return _compact(
        {
            "type": claimed.event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": JobRead.from_job(job).model_dump(mode="json"),
        }
    )


def batch_event(event_type: str, batch_id: str, *, event_id: str, created_at: datetime) -> str:
    """OpenAI's webhook event about a batch, as ``openai.OpenAI().webhooks.unwrap`` parses it.

    Only the batch id is sent, as OpenAI does: the receiver fetches the batch.
    """
    return _compact(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": int(created_at.timestamp()),
            "data": {"id": batch_id},
        }
    )


def schedule_event(
    event_type: str,
    schedule_id: str,
    *,
    note: str | None,
    failures: int,
    event_id: str,
    created_at: datetime,
) -> str:
    """A schedule's event in the envelope of a batch's: it paused (the only one sent), with
    the note it paused with and the consecutive failed firings that made it pause."""
    return _compact(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": int(created_at.timestamp()),
            "data": {"id": schedule_id, "paused": True, "note": note, "failures": failures},
        }
    )


def _compact(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
