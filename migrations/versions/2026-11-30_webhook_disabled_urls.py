"""webhook disabled urls: a 410 disables a receiver URL per tenant; the deliveries lease index

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_disabled_urls",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("url_sha256", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("webhook_id", sa.String(length=64), nullable=True),
        sa.Column(
            "disabled_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_webhook_disabled_urls_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "url_sha256", name=op.f("pk_webhook_disabled_urls")),
    )
    # Serves deliveries.reconcile's "delivering AND lease_expires_at < now()" branch.
    op.create_index(
        "ix_webhook_deliveries_lease",
        "webhook_deliveries",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'delivering'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_webhook_deliveries_lease",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("status = 'delivering'"),
    )
    op.drop_table("webhook_disabled_urls")
