"""Webhook signing secrets, disabled receiver URLs, and a job's deliveries."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from api.deps import TenantDep
from api.openapi import V1_ERRORS, errors
from chatjobs import deliveries, jobs
from chatjobs.db import session_scope
from chatjobs.models import DeliveryStatus, WebhookSecret

router = APIRouter(tags=["webhooks"], responses=V1_ERRORS)


class SecretRead(BaseModel):
    secret: str
    created_at: datetime
    expires_at: datetime | None


class SecretList(BaseModel):
    """The secrets in force, newest first: each delivery is signed with all of them."""

    data: list[SecretRead]


class AttemptRead(BaseModel):
    attempt: int
    status_code: int | None
    latency_ms: int
    error: str | None
    blocked: bool
    created_at: datetime


class DeliveryRead(BaseModel):
    id: uuid.UUID
    event_type: str
    webhook_id: str
    url: str
    status: DeliveryStatus
    attempts: list[AttemptRead]
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


def _secrets(rows: list[WebhookSecret]) -> SecretList:
    return SecretList(
        data=[
            SecretRead(secret=r.secret, created_at=r.created_at, expires_at=r.expires_at)
            for r in rows
        ]
    )


@router.get("/v1/webhooks/secret", response_model=SecretList)
def get_secret(tenant_id: TenantDep) -> SecretList:
    """The tenant's signing secrets (whsec_...); one is created on first use."""
    with session_scope() as session:
        return _secrets(deliveries.active_secrets(session, tenant_id))


def _whole(value: Any) -> Any:
    # JSON Schema's integer is a number without a fraction: 60.0 is 60; true and "60" are not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


class RotateSecret(BaseModel):
    # Strict: `false` or "1e3" would otherwise become 0 or 1000 and cut the overlap short.
    model_config = ConfigDict(extra="forbid", strict=True)

    overlap_seconds: Annotated[int, Field(ge=0, le=30 * 86400), BeforeValidator(_whole)] = Field(
        default=86400, description="how long the old secret keeps signing (default one day)"
    )


@router.post(
    "/v1/webhooks/secret/rotate", response_model=SecretList, responses=errors(400, 413, 422)
)
def rotate_secret(tenant_id: TenantDep, body: RotateSecret | None = None) -> SecretList:
    """Start signing with a new secret; the old one also signs for ``overlap_seconds``."""
    overlap_seconds = (body or RotateSecret()).overlap_seconds
    with session_scope() as session:
        return _secrets(deliveries.rotate_secret(session, tenant_id, overlap_seconds))


class DisabledUrlRead(BaseModel):
    url: str
    disabled_at: datetime
    status_code: int | None = Field(description="what the receiver answered (410)")
    reason: str
    webhook_id: str | None = Field(description="the webhook-id of the delivery it refused")


class DisabledUrlList(BaseModel):
    """URLs nothing is sent to: each answered 410. Events for them are recorded as gone."""

    data: list[DisabledUrlRead]


class EnableUrl(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[str, Field(max_length=2048, pattern=r"^[^\x00]*$")]


class EnabledUrl(BaseModel):
    url: str
    enabled: bool = True


@router.get("/v1/webhooks/disabled", response_model=DisabledUrlList)
def list_disabled(tenant_id: TenantDep) -> DisabledUrlList:
    """The tenant's webhook URLs disabled by a 410, most recent first."""
    with session_scope() as session:
        rows = deliveries.disabled_urls(session, tenant_id)
        return DisabledUrlList(
            data=[
                DisabledUrlRead(
                    url=r.url,
                    disabled_at=r.disabled_at,
                    status_code=r.status_code,
                    reason=r.reason,
                    webhook_id=r.webhook_id,
                )
                for r in rows
            ]
        )


@router.post("/v1/webhooks/enable", response_model=EnabledUrl, responses=errors(400, 404, 413, 422))
def enable_url(tenant_id: TenantDep, body: EnableUrl) -> EnabledUrl:
    """Deliver to a disabled URL again (later events; earlier ones by redelivery); 404 if
    it is not disabled."""
    with session_scope() as session:
        deliveries.enable_url(session, tenant_id, body.url)
    return EnabledUrl(url=body.url)


@router.get(
    "/v1/jobs/{job_id}/deliveries", response_model=list[DeliveryRead], responses=errors(404)
)
def list_deliveries(job_id: uuid.UUID, tenant_id: TenantDep) -> list[DeliveryRead]:
    """The job's webhook deliveries, each with every attempt made."""
    with session_scope() as session:
        jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        rows = deliveries.list_for_job(session, tenant_id, job_id)
        attempts = deliveries.attempts_for(session, [r.id for r in rows])
        return [
            DeliveryRead(
                id=r.id,
                event_type=r.event_type,
                webhook_id=r.msg_id,
                url=r.url,
                status=r.status,
                attempts=[
                    AttemptRead(
                        attempt=a.attempt,
                        status_code=a.status_code,
                        latency_ms=a.latency_ms,
                        error=a.error,
                        blocked=a.blocked,
                        created_at=a.created_at,
                    )
                    for a in attempts
                    if a.delivery_id == r.id
                ],
                next_attempt_at=r.next_attempt_at,
                last_status_code=r.last_status_code,
                last_error=r.last_error,
                created_at=r.created_at,
                delivered_at=r.delivered_at,
            )
            for r in rows
        ]


class Redelivered(BaseModel):
    id: uuid.UUID
    status: DeliveryStatus
    webhook_id: str = Field(description="the same webhook-id as every earlier attempt")


@router.post(
    "/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver",
    response_model=Redelivered,
    responses=errors(404, 409, 413),
)
def redeliver(job_id: uuid.UUID, delivery_id: uuid.UUID, tenant_id: TenantDep) -> Redelivered:
    """Send a delivery again (same webhook-id), whatever became of it; 409 while an attempt
    is in flight or while its URL is disabled."""
    with session_scope() as session:
        row = deliveries.redeliver(session, tenant_id, job_id, delivery_id)
        return Redelivered(id=row.id, status=row.status, webhook_id=row.msg_id)
