"""offload to provider batch APIs: upstream_batches, jobs.upstream_batch_id, offloaded calls

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 08:00:00

``upstream_batches``: one batch chatjobs sent (or is sending) to a provider's own batch API
(chatjobs.offload). ``jobs.upstream_batch_id``: the one an offloaded job went out in.
``upstream_calls.offloaded``: the call was made through a provider batch (discounted price).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "upstream_batches",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("route", sa.String(600), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("upstream_file_id", sa.String(200), nullable=True),
        sa.Column("upstream_batch_id", sa.String(200), nullable=True),
        sa.Column("upstream_status", sa.String(40), nullable=True),
        sa.Column("output_file_id", sa.String(2000), nullable=True),
        sa.Column("error_file_id", sa.String(2000), nullable=True),
        sa.Column("items", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("enqueued_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_expires_at", _TZ, nullable=True),
        sa.Column("next_poll_at", _TZ, nullable=True),
        sa.Column("poll_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("ended_at", _TZ, nullable=True),
    )
    op.create_index("ix_upstream_batches_route_status", "upstream_batches", ["route", "status"])
    op.add_column(
        "jobs",
        sa.Column(
            "upstream_batch_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey(
                "upstream_batches.id",
                name="fk_jobs_upstream_batch_id_upstream_batches",
                ondelete="SET NULL",
            ),
            nullable=True,
        ),
    )
    op.create_index(
        "ix_jobs_upstream_batch_id",
        "jobs",
        ["upstream_batch_id"],
        postgresql_where=sa.text("upstream_batch_id IS NOT NULL"),
    )
    op.add_column(
        "upstream_calls",
        sa.Column("offloaded", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("upstream_calls", "offloaded")
    op.drop_index("ix_jobs_upstream_batch_id", table_name="jobs")
    op.drop_column("jobs", "upstream_batch_id")
    op.drop_index("ix_upstream_batches_route_status", table_name="upstream_batches")
    op.drop_table("upstream_batches")
