"""ORM models. Only the chatjobs.jobs package writes jobs."""

from __future__ import annotations

import enum
import os
import threading
import time
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from chatjobs.db import Base

_last_uuid7 = 0
_uuid7_lock = threading.Lock()
_RAND_B = (1 << 62) - 1


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 v7), so ids sort by creation for cursor pagination and
    FIFO. Monotonic within a process (RFC 9562 method 2): an id made in the same millisecond
    as the last is the last plus one, so a batch's lines keep their file order."""
    global _last_uuid7
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & _RAND_B
    with _uuid7_lock:
        if value <= _last_uuid7:
            value = _after(_last_uuid7)
        _last_uuid7 = value
    return uuid.UUID(int=value)


def _after(value: int) -> int:
    """The next v7 id after ``value``: one more in its random bits, carried past the
    version and variant bits."""
    if value & _RAND_B != _RAND_B:
        return value + 1
    rand_a = (value >> 64) & 0xFFF
    if rand_a != 0xFFF:
        return (value & ~((0xFFF << 64) | _RAND_B)) | ((rand_a + 1) << 64)
    ms = (value >> 80) + 1
    return (ms << 80) | (0x7 << 76) | (0b10 << 62)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired}
)

_tz = DateTime(timezone=True)
# Python None is SQL NULL, not JSON null: COALESCE and IS NULL must see it as missing.
_json = JSONB(none_as_null=True)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    # The tenant's own limits: NULL takes the deployment's default (CHATJOBS_TENANT_*),
    # 0 means no limit.
    submit_rps: Mapped[int | None] = mapped_column(Integer)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    max_streams: Mapped[int | None] = mapped_column(Integer)
    max_calls_per_job: Mapped[int | None] = mapped_column(Integer)
    # Dispatch: the tenant's weight in fair share, its cap on jobs in flight (admitted or
    # running), and the fraction of each model's TPM it may use (NULL: no share of its own).
    weight: Mapped[int | None] = mapped_column(Integer)
    max_inflight: Mapped[int | None] = mapped_column(Integer)
    tpm_share: Mapped[float | None] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    # SHA-256 of the key: keys are 256-bit random, so a slow hash adds nothing but latency.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(_tz)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_tenant_id_status_id", "tenant_id", "status", "id"),
        # The dispatcher's read: per tenant, the jobs waiting for admission by priority, then
        # oldest first (chatjobs.jobs.dispatch).
        Index(
            "ix_jobs_ready",
            "queue",
            "tenant_id",
            text("priority DESC"),
            "id",
            postgresql_where=text(
                "status IN ('queued', 'retrying') AND next_attempt_at IS NOT NULL"
            ),
        ),
        Index("ix_jobs_lease", "lease_expires_at", postgresql_where=text("status = 'running'")),
        # The reconciler's page-by-page scan of waiting jobs for lost broker messages.
        Index(
            "ix_jobs_waiting",
            "queue",
            "id",
            postgresql_where=text("status IN ('queued', 'retrying') AND next_attempt_at IS NULL"),
        ),
        # Retention: finished top-level jobs by age.
        Index(
            "ix_jobs_finished",
            "completed_at",
            postgresql_where=text(
                "parent_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled', 'expired')"
            ),
        ),
        UniqueConstraint("parent_id", "step_level", "step_index", name="uq_jobs_parent_id_step"),
        Index(
            "uq_jobs_batch_id_custom_id",
            "batch_id",
            "custom_id",
            unique=True,
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
        Index(
            "ix_jobs_batch_id_batch_seq",
            "batch_id",
            "batch_seq",
            postgresql_where=text("batch_seq IS NOT NULL"),
        ),
        Index(
            "ix_jobs_batch_id_status",
            "batch_id",
            "status",
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
        Index(
            "ix_jobs_deadline",
            "deadline",
            postgresql_where=text("status IN ('queued', 'retrying', 'running')"),
        ),
        Index(
            "ix_jobs_upstream_batch_id",
            "upstream_batch_id",
            postgresql_where=text("upstream_batch_id IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", values_callable=lambda e: [m.value for m in e]),
        default=JobStatus.queued,
    )
    model: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)
    result: Mapped[dict[str, Any] | None] = mapped_column(_json)
    error: Mapped[dict[str, Any] | None] = mapped_column(_json)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", _json)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    long_context: Mapped[dict[str, Any] | None] = mapped_column(_json)
    # AI Gateway cache options (cache_ttl, skip_cache, cache_key); sent only through a gateway.
    gateway: Mapped[dict[str, Any] | None] = mapped_column(_json)
    progress: Mapped[dict[str, Any] | None] = mapped_column(_json)

    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    prompt_token_estimate: Mapped[int | None] = mapped_column(Integer)

    # Higher is admitted first; the class of a job sets its default (chatjobs.jobs.dispatch).
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Estimated tokens (prompt and output budget): what fair share between tenants counts.
    cost: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The broker queue this job's deployment serves: a dispatcher or reconciler only touches
    # its own queue's jobs, so several deployments can share one database.
    queue: Mapped[str] = mapped_column(String(200), server_default="chatjobs")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The fence of every worker write: one more on each claim, never given back (a deferral
    # gives back the attempt, not this), so (job, claim_seq) names one claim for good.
    claim_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=6)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # A line of a batch: the batch and the line's custom_id.
    batch_id: Mapped[str | None] = mapped_column(String(64))
    custom_id: Mapped[str | None] = mapped_column(Text)
    # The order in which the batch's lines ended (1, 2, ...), given under the batch's row lock
    # so it is commit order: the cursor of GET /v1/batches/{id}/results.
    batch_seq: Mapped[int | None] = mapped_column(Integer)
    schedule_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # The nominal instant of the schedule's firing that made this job (UTC).
    scheduled_for: Mapped[datetime | None] = mapped_column(_tz)

    deadline: Mapped[datetime | None] = mapped_column(_tz)
    # A pending job waits for the dispatcher while this is set (and is eligible once it has
    # passed); NULL once admitted, when its message is in the broker.
    next_attempt_at: Mapped[datetime | None] = mapped_column(_tz)
    lease_expires_at: Mapped[datetime | None] = mapped_column(_tz)
    # The worker process (host:pid) holding the lease: for operators, and for tests that
    # kill exactly that process.
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    # The provider batch this job went out in, while offloaded and after (chatjobs.offload).
    upstream_batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("upstream_batches.id", ondelete="SET NULL")
    )
    # Whether the route's batch upstream can run this request as a synchronous call would:
    # None until an offload gather has looked; True: it is never offloaded.
    offload_refused: Mapped[bool | None] = mapped_column(Boolean)

    # Long inputs: how the prompt was counted, and the request actually sent when it differs
    # from the one submitted (truncated, or one chunk of a map-reduce).
    token_count_method: Mapped[str | None] = mapped_column(String(32))
    upstream_request: Mapped[dict[str, Any] | None] = mapped_column(_json)
    # Too large to plan in the API: the worker that claims it counts and plans it first.
    needs_plan: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # A map or reduce step of a chunked job is a job of its own, so it is claimed, leased,
    # retried and recovered like any other; its parent waits for its children.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    step_kind: Mapped[str | None] = mapped_column(String(16))
    step_level: Mapped[int | None] = mapped_column(Integer)
    step_index: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(_tz)
    completed_at: Mapped[datetime | None] = mapped_column(_tz)


class UpstreamCall(Base):
    """One HTTP call to the upstream, whatever its outcome."""

    __tablename__ = "upstream_calls"
    # Each claim makes at most one call: a retried commit finds its call logged already.
    __table_args__ = (
        UniqueConstraint("job_id", "claim_seq", name="uq_upstream_calls_job_claim"),
        # GET /v1/usage: a tenant's calls in a time range.
        Index("ix_upstream_calls_tenant_id_created_at", "tenant_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # The job's tenant, copied (no foreign key: the job's cascade already removes the row).
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    claim_seq: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    # Answered from an AI Gateway cache: the tokens above were returned, not billed.
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # The provider reported no usage: the tokens above were counted by chatjobs.
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # Made through a provider's batch API (chatjobs.offload): billed at the batch discount.
    offloaded: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    request_id: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())


class UpstreamBatch(Base):
    """A batch sent (or being sent) to a provider's own batch API (chatjobs.offload); its id
    is the ``chatjobs_ref`` in the upstream batch's metadata."""

    __tablename__ = "upstream_batches"
    __table_args__ = (Index("ix_upstream_batches_route_status", "route", "status"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    # The route's limit key: what offload_enqueued_tokens is counted against.
    route: Mapped[str] = mapped_column(String(600))
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(40))
    # building | submitted | ended | failed_to_submit
    status: Mapped[str] = mapped_column(String(20))
    upstream_file_id: Mapped[str | None] = mapped_column(String(200))
    upstream_batch_id: Mapped[str | None] = mapped_column(String(200))
    upstream_status: Mapped[str | None] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(2000))
    error_file_id: Mapped[str | None] = mapped_column(String(2000))
    items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    enqueued_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Who is building or polling it, until when.
    lease_expires_at: Mapped[datetime | None] = mapped_column(_tz)
    next_poll_at: Mapped[datetime | None] = mapped_column(_tz)
    poll_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set before each create request goes out: a pass finding it set looks for the batch that
    # create may have made before making one.
    submit_started_at: Mapped[datetime | None] = mapped_column(_tz)
    # How many requests that create sent (what find looks for where batches carry no ref).
    submit_items: Mapped[int | None] = mapped_column(Integer)
    # Every item was cancelled in chatjobs: the upstream batch is to be cancelled.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    ended_at: Mapped[datetime | None] = mapped_column(_tz)


class StoredFile(Base):
    """A file of the OpenAI Files API: an uploaded batch input (its bytes in the file store),
    or a batch's output or error file (its lines read from the batch's jobs, never copied)."""

    __tablename__ = "files"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_files_tenant_idempotency_key"),
        Index("ix_files_tenant_id_id", "tenant_id", "id"),
        Index("ix_files_expires_at", "expires_at"),
    )

    # "file-" and a UUIDv7's hex: ids sort by creation for cursor pagination.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # Where the content is: "postgres" (a large object, ``location`` its oid), "directory"
    # (``location`` a path under the files directory), or "batch" (the lines of ``batch_id``
    # of ``kind`` output or error).
    storage: Mapped[str] = mapped_column(String(16))
    location: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str | None] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(_tz)


class Batch(Base):
    """An OpenAI-compatible batch: every line of its input file is a job carrying its id.

    The request counts, output sizes and usage are kept up to date by the transaction that
    ends each line (chatjobs.batches.progress), so reading a batch is one row, and the batch
    ends in the same transaction as its last line.
    """

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_batches_tenant_idempotency_key"),
        Index("ix_batches_tenant_id_id", "tenant_id", "id"),
        Index(
            "ix_batches_open",
            "queue",
            "status",
            postgresql_where=text("status IN ('validating', 'in_progress', 'cancelling')"),
        ),
        Index("ix_batches_finished_at", "finished_at"),
    )

    # "batch_" and a UUIDv7's hex.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    window_seconds: Mapped[int] = mapped_column(Integer)
    output_expires_seconds: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(String(200))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", _json)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[Any] | None] = mapped_column(_json)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    retry_of: Mapped[str | None] = mapped_column(String(64))

    request_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    request_completed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    request_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    request_expired: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    request_cancelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    output_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    # The deployment (broker queue) whose processes validate, release, expire and prune it.
    queue: Mapped[str] = mapped_column(String(200), server_default="chatjobs")
    # Validation is claimed like a job: whoever validates holds this lease, and a batch
    # whose validator died is validated again by the reconciler, a bounded number of times.
    lease_expires_at: Mapped[datetime | None] = mapped_column(_tz)
    validation_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    in_progress_at: Mapped[datetime | None] = mapped_column(_tz)
    expires_at: Mapped[datetime] = mapped_column(_tz)
    finalizing_at: Mapped[datetime | None] = mapped_column(_tz)
    completed_at: Mapped[datetime | None] = mapped_column(_tz)
    failed_at: Mapped[datetime | None] = mapped_column(_tz)
    expired_at: Mapped[datetime | None] = mapped_column(_tz)
    cancelling_at: Mapped[datetime | None] = mapped_column(_tz)
    cancelled_at: Mapped[datetime | None] = mapped_column(_tz)
    # When it reached a final status (completed, failed, expired, cancelled): retention.
    finished_at: Mapped[datetime | None] = mapped_column(_tz)


class WebhookSecret(Base):
    """A tenant's signing secret; several are active during a rotation window."""

    __tablename__ = "webhook_secrets"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    # Kept in the clear: HMAC signing needs the secret itself, as in every webhook sender.
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(_tz)


class DeliveryStatus(enum.StrEnum):
    pending = "pending"
    delivering = "delivering"
    succeeded = "succeeded"
    failed = "failed"
    gone = "gone"
    blocked = "blocked"


class WebhookDelivery(Base):
    """One event for one URL, delivered at least once under one webhook-id."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "event_type", name="uq_webhook_deliveries_job_event"),
        UniqueConstraint("batch_id", "event_type", name="uq_webhook_deliveries_batch_event"),
        # An event is about one job, one batch or one schedule.
        CheckConstraint("num_nonnulls(job_id, batch_id, schedule_id) = 1", name="one_subject"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # The reconciler's search for attempts whose worker died (lease run out).
        Index(
            "ix_webhook_deliveries_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'delivering'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    schedule_id: Mapped[str | None] = mapped_column(
        ForeignKey("schedules.id", ondelete="CASCADE"), index=True
    )
    event_type: Mapped[str] = mapped_column(String(40))
    queue: Mapped[str] = mapped_column(String(200), server_default="chatjobs")
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(
            DeliveryStatus,
            name="delivery_status",
            values_callable=lambda e: [m.value for m in e],
        ),
        default=DeliveryStatus.pending,
    )
    # The body, fixed at the first attempt so every retry sends the same bytes.
    payload: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A pending job waits for the dispatcher while this is set (and is eligible once it has
    # passed); NULL once admitted, when its message is in the broker.
    next_attempt_at: Mapped[datetime | None] = mapped_column(_tz)
    lease_expires_at: Mapped[datetime | None] = mapped_column(_tz)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(_tz)


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery, whatever came of it."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())


class WebhookDisabledUrl(Base):
    """A tenant's receiver URL that answered 410: nothing is sent to it until re-enabled."""

    __tablename__ = "webhook_disabled_urls"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    # The key holds the URL's hash: a URL may be longer than a btree entry can be.
    url_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    # The webhook-id of the delivery the receiver refused.
    webhook_id: Mapped[str | None] = mapped_column(String(64))
    disabled_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())


class FairShare(Base):
    """A tenant's place in fair share on one queue: the estimated tokens admitted for it
    divided by its weight (a virtual time), and its token buckets of each model's TPM share."""

    __tablename__ = "fair_shares"

    queue: Mapped[str] = mapped_column(String(200), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    served: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # model -> [tokens in the bucket, epoch seconds when last filled]
    buckets: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class FairClock(Base):
    """A queue's virtual time: where a tenant that was idle rejoins fair share, so that
    idling never banks credit."""

    __tablename__ = "fair_clocks"

    queue: Mapped[str] = mapped_column(String(200), primary_key=True)
    vtime: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Schedule(Base):
    """A cron schedule: when it fires (cron in its time zone, between start_at and end_at), what
    each firing submits (a job or a batch body), and what to do with late or overlapping
    firings. ``next_fire_at`` is the next nominal instant not yet handled: the ticker's index."""

    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_tenant_id_id", "tenant_id", "id"),
        Index("ix_schedules_due", "queue", "next_fire_at", postgresql_where=text("NOT paused")),
    )

    # "sched_" and a UUIDv7's hex.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    queue: Mapped[str] = mapped_column(String(200), server_default="chatjobs")
    cron: Mapped[str] = mapped_column(String(256))
    timezone: Mapped[str] = mapped_column(String(64))
    start_at: Mapped[datetime | None] = mapped_column(_tz)
    end_at: Mapped[datetime | None] = mapped_column(_tz)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    note: Mapped[str | None] = mapped_column(Text)
    # "job" (a POST /v1/jobs body) or "batch" (a POST /v1/batches body).
    kind: Mapped[str] = mapped_column(String(8))
    template: Mapped[dict[str, Any]] = mapped_column(JSONB)
    overlap_policy: Mapped[str] = mapped_column(String(16))
    catchup: Mapped[str] = mapped_column(String(8))
    catchup_window: Mapped[int] = mapped_column(Integer)
    max_runs: Mapped[int | None] = mapped_column(Integer)
    runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pause_after_failures: Mapped[int | None] = mapped_column(Integer)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_url: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", _json)
    next_fire_at: Mapped[datetime | None] = mapped_column(_tz)
    # The last nominal instant handled (fired, skipped or missed): the next firing's window_start.
    last_scheduled_for: Mapped[datetime | None] = mapped_column(_tz)
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())


class ScheduleFiring(Base):
    """One nominal fire time of a schedule, at most once: the unique key is what makes any
    number of tickers, restarts and repeated backfills fire each occurrence exactly once."""

    __tablename__ = "schedule_firings"
    __table_args__ = (
        UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_firings_schedule_id"),
        # The ticker's look at firings whose job may still run, or that wait to start.
        Index(
            "ix_schedule_firings_live",
            "schedule_id",
            "scheduled_for",
            postgresql_where=text("open OR status = 'buffered'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    scheduled_for: Mapped[datetime] = mapped_column(_tz)
    # cadence | catchup | trigger | backfill
    reason: Mapped[str] = mapped_column(String(16))
    # fired | buffered | skipped | missed | failed (the template could not be submitted)
    status: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    batch_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[dict[str, Any] | None] = mapped_column(_json)
    # Fired and its job (or batch) not yet seen ended: it occupies the schedule (overlap).
    open: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    fired_at: Mapped[datetime | None] = mapped_column(_tz)


class UiSession(Base):
    """A signed-in browser of the /ui console: only the SHA-256 of its cookie's token is kept,
    and it lasts while its API key does (every request checks ``api_keys.revoked_at``)."""

    __tablename__ = "ui_sessions"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    # The synchronizer token every state-changing form of this session carries.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(_tz, server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(_tz, index=True)
