"""queue per job and delivery

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 23:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("jobs", "webhook_deliveries"):
        op.add_column(
            table,
            sa.Column("queue", sa.String(length=200), server_default="chatjobs", nullable=False),
        )


def downgrade() -> None:
    for table in ("webhook_deliveries", "jobs"):
        op.drop_column(table, "queue")
