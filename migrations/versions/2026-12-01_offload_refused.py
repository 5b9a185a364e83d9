"""offload: jobs an upstream's batch format cannot run, and when a submit was first tried

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 11:00:00

``jobs.offload_refused``: whether the route's batch upstream can run this request as asked:
NULL until an offload gather has looked; true when it cannot (Anthropic: ``n > 1``, images,
``response_format``...), and the job runs synchronously even when its deadline would allow
offloading. ``upstream_batches.submit_started_at`` and ``submit_items``: set before a create
request is sent (when, and how many requests); a row that has them may already have an
upstream batch, so a later pass looks for that batch before creating one. Rows building
already are given their creation time, as the code before looked for every row's batch.
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
    op.add_column("jobs", sa.Column("offload_refused", sa.Boolean(), nullable=True))
    op.add_column(
        "upstream_batches",
        sa.Column("submit_started_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column("upstream_batches", sa.Column("submit_items", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE upstream_batches SET submit_started_at = created_at, submit_items = items"
        " WHERE status = 'building'"
    )


def downgrade() -> None:
    op.drop_column("upstream_batches", "submit_items")
    op.drop_column("upstream_batches", "submit_started_at")
    op.drop_column("jobs", "offload_refused")
