"""offload: jobs an upstream's batch format cannot run, and when a submit was first tried

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 11:00:00

``jobs.offload_refused``: the route's batch upstream cannot express this request faithfully
(Anthropic: ``n > 1``, images, ``response_format``...), so it runs synchronously even when
its deadline would allow offloading. ``upstream_batches.submit_started_at``: set before the
first create request is sent; a row that has it may already have an upstream batch, so a
later pass looks for that batch before creating one (a row that has not never does).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("offload_refused", sa.Boolean(), nullable=False, server_default="false"),
    )
    op.add_column(
        "upstream_batches",
        sa.Column("submit_started_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("upstream_batches", "submit_started_at")
    op.drop_column("jobs", "offload_refused")
