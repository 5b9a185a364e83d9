"""fair dispatch: jobs wait in Postgres until a dispatcher admits them, fairly between tenants

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 21:00:00

A pending job is either waiting for admission (``next_attempt_at`` set: eligible once it has
passed) or admitted (``next_attempt_at`` NULL: its message is in the broker). Batch lines no
longer need a ``held`` flag of their own: they wait like every job, at the batch class's
priority. ``cost`` is a job's estimated tokens, the unit of fair share between tenants.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_tz = sa.DateTime(timezone=True)
_PENDING = "status IN ('queued', 'retrying')"


def upgrade() -> None:
    # NULL: the deployment's default (CHATJOBS_TENANT_WEIGHT, CHATJOBS_TENANT_MAX_INFLIGHT);
    # tpm_share NULL: no share of a model's TPM beyond what fair share gives.
    op.add_column("tenants", sa.Column("weight", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("max_inflight", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("tpm_share", sa.Float(), nullable=True))

    op.add_column("jobs", sa.Column("cost", sa.Integer(), server_default="1", nullable=False))
    # Waiting jobs get an estimate now (the prompt's count, else a quarter of its bytes).
    op.execute(
        "UPDATE jobs SET cost = GREATEST(1, COALESCE(prompt_token_estimate,"
        " octet_length(request::text) / 4)) WHERE " + _PENDING
    )
    # Held batch lines become waiting jobs of the batch class.
    op.execute(
        "UPDATE jobs SET next_attempt_at = now(), priority = priority - 10 WHERE held AND "
        + _PENDING
    )
    op.drop_index("ix_jobs_released", table_name="jobs")
    op.drop_index("ix_jobs_held", table_name="jobs")
    op.drop_column("jobs", "held")
    op.drop_index("ix_jobs_due", table_name="jobs")
    # The dispatcher's read: per tenant, the waiting jobs by priority, then oldest first.
    op.create_index(
        "ix_jobs_ready",
        "jobs",
        ["queue", "tenant_id", sa.text("priority DESC"), "id"],
        postgresql_where=sa.text(_PENDING + " AND next_attempt_at IS NOT NULL"),
    )

    op.create_table(
        "fair_shares",
        sa.Column("queue", sa.String(200), primary_key=True),
        sa.Column(
            "tenant_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey(
                "tenants.id", ondelete="CASCADE", name="fk_fair_shares_tenant_id_tenants"
            ),
            primary_key=True,
        ),
        sa.Column("served", sa.Float(), server_default="0", nullable=False),
        sa.Column("buckets", postgresql.JSONB(), nullable=True),
    )
    op.create_table(
        "fair_clocks",
        sa.Column("queue", sa.String(200), primary_key=True),
        sa.Column("vtime", sa.Float(), server_default="0", nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fair_clocks")
    op.drop_table("fair_shares")
    op.drop_index("ix_jobs_ready", table_name="jobs")
    op.create_index("ix_jobs_due", "jobs", ["next_attempt_at"], postgresql_where=sa.text(_PENDING))
    op.add_column("jobs", sa.Column("held", sa.Boolean(), server_default="false", nullable=False))
    op.execute(
        "UPDATE jobs SET held = true, next_attempt_at = NULL, priority = priority + 10"
        " WHERE batch_id IS NOT NULL AND next_attempt_at IS NOT NULL AND " + _PENDING
    )
    op.create_index(
        "ix_jobs_held", "jobs", ["queue", "priority", "id"], postgresql_where=sa.text("held")
    )
    op.create_index(
        "ix_jobs_released",
        "jobs",
        ["queue"],
        postgresql_where=sa.text("batch_id IS NOT NULL AND NOT held AND " + _PENDING),
    )
    op.drop_column("jobs", "cost")
    for name in ("tpm_share", "max_inflight", "weight"):
        op.drop_column("tenants", name)
