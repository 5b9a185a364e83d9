"""provider adapters: cached and estimated calls, per-job gateway options

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 07:00:00

``upstream_calls.cached``: answered from an AI Gateway cache (the provider billed no tokens;
the usage it returned is kept). ``upstream_calls.usage_estimated``: the provider reported no
usage and chatjobs counted it. ``jobs.gateway``: the job's AI Gateway cache options.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("cached", "usage_estimated"):
        op.add_column(
            "upstream_calls",
            sa.Column(column, sa.Boolean(), server_default=sa.text("false"), nullable=False),
        )
    op.add_column("jobs", sa.Column("gateway", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "gateway")
    op.drop_column("upstream_calls", "usage_estimated")
    op.drop_column("upstream_calls", "cached")
