"""schedules: cron schedules and one row per nominal firing

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 03:30:00

A schedule fires a job (or a batch) per nominal instant of its cron in its time zone; the
``schedule_firings`` row of that instant, unique per (schedule, scheduled_for), is inserted in
the same transaction as what it fires, so each occurrence fires exactly once however many
tickers run.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("scheduled_for", _tz, nullable=True))
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE", name="fk_schedules_tenant_id_tenants"),
            nullable=False,
        ),
        sa.Column("queue", sa.String(200), server_default="chatjobs", nullable=False),
        sa.Column("cron", sa.String(256), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("start_at", _tz, nullable=True),
        sa.Column("end_at", _tz, nullable=True),
        sa.Column("paused", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("template", postgresql.JSONB(), nullable=False),
        sa.Column("overlap_policy", sa.String(16), nullable=False),
        sa.Column("catchup", sa.String(8), nullable=False),
        sa.Column("catchup_window", sa.Integer(), nullable=False),
        sa.Column("max_runs", sa.Integer(), nullable=True),
        sa.Column("runs", sa.Integer(), server_default="0", nullable=False),
        sa.Column("pause_after_failures", sa.Integer(), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.Column("next_fire_at", _tz, nullable=True),
        sa.Column("last_scheduled_for", _tz, nullable=True),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _tz, server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_schedules_tenant_id_id", "schedules", ["tenant_id", "id"])
    op.create_index(
        "ix_schedules_due",
        "schedules",
        ["queue", "next_fire_at"],
        postgresql_where=sa.text("NOT paused"),
    )
    op.create_table(
        "schedule_firings",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "schedule_id",
            sa.String(64),
            sa.ForeignKey(
                "schedules.id", ondelete="CASCADE", name="fk_schedule_firings_schedule_id_schedules"
            ),
            nullable=False,
        ),
        sa.Column("scheduled_for", _tz, nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("error", postgresql.JSONB(), nullable=True),
        sa.Column("open", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("fired_at", _tz, nullable=True),
        sa.UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_firings_schedule_id"),
    )
    op.create_index(
        "ix_schedule_firings_live",
        "schedule_firings",
        ["schedule_id", "scheduled_for"],
        postgresql_where=sa.text("open OR status = 'buffered'"),
    )
    # A schedule's own events (schedule.paused) are webhook deliveries like a job's.
    op.add_column(
        "webhook_deliveries",
        sa.Column(
            "schedule_id",
            sa.String(64),
            sa.ForeignKey(
                "schedules.id",
                ondelete="CASCADE",
                name="fk_webhook_deliveries_schedule_id_schedules",
            ),
            nullable=True,
        ),
    )
    op.create_index("ix_webhook_deliveries_schedule_id", "webhook_deliveries", ["schedule_id"])
    op.drop_constraint("ck_webhook_deliveries_job_or_batch", "webhook_deliveries")
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_one_subject"),
        "webhook_deliveries",
        "num_nonnulls(job_id, batch_id, schedule_id) = 1",
    )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE schedule_id IS NOT NULL")
    op.drop_constraint("ck_webhook_deliveries_one_subject", "webhook_deliveries")
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_job_or_batch"),
        "webhook_deliveries",
        "(job_id IS NULL) <> (batch_id IS NULL)",
    )
    op.drop_index("ix_webhook_deliveries_schedule_id", table_name="webhook_deliveries")
    op.drop_column("webhook_deliveries", "schedule_id")
    op.drop_table("schedule_firings")
    op.drop_table("schedules")
    op.drop_column("jobs", "scheduled_for")
