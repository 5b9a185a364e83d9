"""usage: upstream calls carry their tenant, indexed by time

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 05:00:00

GET /v1/usage reads a tenant's calls in a time range: with the tenant on the call's row and an
index on (tenant_id, created_at) that read is bounded by the range asked for, not by every job
the tenant has kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "upstream_calls", sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=True)
    )
    op.execute(
        "UPDATE upstream_calls u SET tenant_id = j.tenant_id FROM jobs j WHERE j.id = u.job_id"
    )
    op.create_index(
        "ix_upstream_calls_tenant_id_created_at", "upstream_calls", ["tenant_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_upstream_calls_tenant_id_created_at", table_name="upstream_calls")
    op.drop_column("upstream_calls", "tenant_id")
