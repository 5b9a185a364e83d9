"""chunked jobs: steps as child jobs, token count method, upstream request

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("token_count_method", sa.String(length=32), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("upstream_request", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column("jobs", sa.Column("parent_id", sa.UUID(), nullable=True))
    op.add_column("jobs", sa.Column("step_kind", sa.String(length=16), nullable=True))
    op.add_column("jobs", sa.Column("step_level", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("step_index", sa.Integer(), nullable=True))
    op.create_foreign_key(
        op.f("fk_jobs_parent_id_jobs"), "jobs", "jobs", ["parent_id"], ["id"], ondelete="CASCADE"
    )
    op.create_index(op.f("ix_jobs_parent_id"), "jobs", ["parent_id"], unique=False)
    op.create_unique_constraint(
        "uq_jobs_parent_id_step", "jobs", ["parent_id", "step_level", "step_index"]
    )


def downgrade() -> None:
    op.drop_constraint("uq_jobs_parent_id_step", "jobs", type_="unique")
    op.drop_index(op.f("ix_jobs_parent_id"), table_name="jobs")
    op.drop_constraint(op.f("fk_jobs_parent_id_jobs"), "jobs", type_="foreignkey")
    for column in (
        "step_index",
        "step_level",
        "step_kind",
        "parent_id",
        "upstream_request",
        "token_count_method",
    ):
        op.drop_column("jobs", column)
