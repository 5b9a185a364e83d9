"""job core: claim sequence, idempotent call log, unplanned jobs, retention and scan indexes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WAITING = "status IN ('queued', 'retrying') AND next_attempt_at IS NULL"
_FINISHED = "parent_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled', 'expired')"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("claim_seq", sa.Integer(), server_default="0", nullable=False))
    op.add_column(
        "jobs", sa.Column("needs_plan", sa.Boolean(), server_default="false", nullable=False)
    )
    op.add_column("upstream_calls", sa.Column("claim_seq", sa.Integer(), nullable=True))
    # Existing calls get distinct numbers per job; each job's sequence starts above them, so
    # no new call can collide with an old one.
    op.execute(
        """
        UPDATE upstream_calls c SET claim_seq = n.seq
        FROM (SELECT id, row_number() OVER (PARTITION BY job_id ORDER BY id) AS seq
              FROM upstream_calls) n
        WHERE c.id = n.id
        """
    )
    op.execute(
        """
        UPDATE jobs j SET claim_seq = j.attempts + COALESCE(
            (SELECT count(*) FROM upstream_calls c WHERE c.job_id = j.id), 0)
        """
    )
    op.alter_column("upstream_calls", "claim_seq", nullable=False)
    op.drop_index("ix_upstream_calls_job_id", table_name="upstream_calls")
    op.create_unique_constraint(
        "uq_upstream_calls_job_claim", "upstream_calls", ["job_id", "claim_seq"]
    )
    op.drop_index("ix_jobs_stale", table_name="jobs")
    op.create_index("ix_jobs_waiting", "jobs", ["queue", "id"], postgresql_where=sa.text(_WAITING))
    op.create_index(
        "ix_jobs_finished", "jobs", ["completed_at"], postgresql_where=sa.text(_FINISHED)
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    op.create_index("ix_jobs_stale", "jobs", ["updated_at"], postgresql_where=sa.text(_WAITING))
    op.drop_constraint("uq_upstream_calls_job_claim", "upstream_calls", type_="unique")
    op.create_index("ix_upstream_calls_job_id", "upstream_calls", ["job_id"])
    op.drop_column("upstream_calls", "claim_seq")
    op.drop_column("jobs", "needs_plan")
    op.drop_column("jobs", "claim_seq")
