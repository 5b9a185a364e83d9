"""batches: OpenAI-compatible files and batches, batch lines as jobs, batch webhook events

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 20:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_tz = sa.DateTime(timezone=True)
_COUNTERS = (
    "request_total",
    "request_completed",
    "request_failed",
    "request_expired",
    "request_cancelled",
)
_SUMS = (
    "output_bytes",
    "error_bytes",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE", name="fk_files_tenant_id_tenants"),
            nullable=False,
        ),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("storage", sa.String(16), nullable=False),
        sa.Column("location", sa.Text()),
        sa.Column("batch_id", sa.String(64)),
        sa.Column("kind", sa.String(16)),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", _tz),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_files_tenant_idempotency_key"),
    )
    op.create_index("ix_files_tenant_id_id", "files", ["tenant_id", "id"])
    op.create_index("ix_files_expires_at", "files", ["expires_at"])

    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE", name="fk_batches_tenant_id_tenants"),
            nullable=False,
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("output_expires_seconds", sa.Integer()),
        sa.Column("model", sa.String(200)),
        sa.Column("metadata", postgresql.JSONB()),
        sa.Column("webhook_url", sa.Text()),
        sa.Column("errors", postgresql.JSONB()),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("retry_of", sa.String(64)),
        *(sa.Column(name, sa.Integer(), server_default="0", nullable=False) for name in _COUNTERS),
        *(sa.Column(name, sa.BigInteger(), server_default="0", nullable=False) for name in _SUMS),
        sa.Column("queue", sa.String(200), server_default="chatjobs", nullable=False),
        sa.Column("lease_expires_at", _tz),
        sa.Column("validation_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("in_progress_at", _tz),
        sa.Column("expires_at", _tz, nullable=False),
        sa.Column("finalizing_at", _tz),
        sa.Column("completed_at", _tz),
        sa.Column("failed_at", _tz),
        sa.Column("expired_at", _tz),
        sa.Column("cancelling_at", _tz),
        sa.Column("cancelled_at", _tz),
        sa.Column("finished_at", _tz),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name="uq_batches_tenant_idempotency_key"
        ),
    )
    op.create_index("ix_batches_tenant_id_id", "batches", ["tenant_id", "id"])
    op.create_index(
        "ix_batches_open",
        "batches",
        ["queue", "status"],
        postgresql_where=sa.text("status IN ('validating', 'in_progress', 'cancelling')"),
    )
    op.create_index("ix_batches_finished_at", "batches", ["finished_at"])

    op.add_column("jobs", sa.Column("custom_id", sa.Text()))
    op.add_column("jobs", sa.Column("held", sa.Boolean(), server_default="false", nullable=False))
    op.add_column("jobs", sa.Column("batch_seq", sa.Integer()))
    op.drop_index("ix_jobs_batch_id", table_name="jobs")
    op.create_index(
        "ix_jobs_batch_id_batch_seq",
        "jobs",
        ["batch_id", "batch_seq"],
        postgresql_where=sa.text("batch_seq IS NOT NULL"),
    )
    op.create_index(
        "uq_jobs_batch_id_custom_id",
        "jobs",
        ["batch_id", "custom_id"],
        unique=True,
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_batch_id_status",
        "jobs",
        ["batch_id", "status"],
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_held", "jobs", ["queue", "priority", "id"], postgresql_where=sa.text("held")
    )
    op.create_index(
        "ix_jobs_released",
        "jobs",
        ["queue"],
        postgresql_where=sa.text(
            "batch_id IS NOT NULL AND NOT held AND status IN ('queued', 'retrying')"
        ),
    )

    op.alter_column("webhook_deliveries", "job_id", nullable=True)
    op.add_column(
        "webhook_deliveries",
        sa.Column(
            "batch_id",
            sa.String(64),
            sa.ForeignKey(
                "batches.id",
                ondelete="CASCADE",
                name="fk_webhook_deliveries_batch_id_batches",
            ),
        ),
    )
    op.create_unique_constraint(
        "uq_webhook_deliveries_batch_event", "webhook_deliveries", ["batch_id", "event_type"]
    )
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_job_or_batch"),
        "webhook_deliveries",
        "(job_id IS NULL) <> (batch_id IS NULL)",
    )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE batch_id IS NOT NULL")
    op.drop_constraint("ck_webhook_deliveries_job_or_batch", "webhook_deliveries")
    op.drop_constraint("uq_webhook_deliveries_batch_event", "webhook_deliveries")
    op.drop_column("webhook_deliveries", "batch_id")
    op.alter_column("webhook_deliveries", "job_id", nullable=False)
    op.drop_index("ix_jobs_released", table_name="jobs")
    op.drop_index("ix_jobs_held", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_status", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_batch_seq", table_name="jobs")
    op.drop_index("uq_jobs_batch_id_custom_id", table_name="jobs")
    op.create_index("ix_jobs_batch_id", "jobs", ["batch_id"])
    op.drop_column("jobs", "batch_seq")
    op.drop_column("jobs", "held")
    op.drop_column("jobs", "custom_id")
    op.drop_table("batches")
    op.execute("SELECT lo_unlink(location::oid) FROM files WHERE storage = 'postgres'")
    op.drop_table("files")
