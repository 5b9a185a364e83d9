"""tenant limits: per-tenant submissions per second, queued jobs, streams, calls per job

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("submit_rps", "max_queued", "max_streams", "max_calls_per_job")


def upgrade() -> None:
    # NULL: the deployment's default applies, so existing tenants keep today's behaviour.
    for name in _COLUMNS:
        op.add_column("tenants", sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    for name in reversed(_COLUMNS):
        op.drop_column("tenants", name)
