"""job claimed_by

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 22:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("claimed_by", sa.String(length=200), nullable=True))
    # The reconciler's scan for messages lost before a worker saw them.
    op.create_index(
        "ix_jobs_stale",
        "jobs",
        ["updated_at"],
        postgresql_where=sa.text("status IN ('queued', 'retrying') AND next_attempt_at IS NULL"),
    )
    op.create_index(
        "ix_jobs_deadline",
        "jobs",
        ["deadline"],
        postgresql_where=sa.text("status IN ('queued', 'retrying', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_deadline", table_name="jobs")
    op.drop_index("ix_jobs_stale", table_name="jobs")
    op.drop_column("jobs", "claimed_by")
