"""high availability: power management, fence agents, HA restarts owed

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 20:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("pm_enabled", sa.Boolean(), server_default=sa.false(),
                                   nullable=False))
    op.create_table(
        "fence_agents",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("host_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("password", sa.String(length=255), nullable=False),
        sa.Column("options", sa.String(length=4000), nullable=False),
        sa.Column("encrypt_options", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"],
                                name=op.f("fk_fence_agents_host_id_hosts"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fence_agents")),
    )
    op.create_index(op.f("ix_fence_agents_host_id"), "fence_agents", ["host_id"], unique=False)
    op.create_table(
        "ha_restarts",
        sa.Column("vm_id", sa.String(length=36), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("host_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"],
                                name=op.f("fk_ha_restarts_vm_id_vms"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vm_id", name=op.f("pk_ha_restarts")),
    )


def downgrade() -> None:
    op.drop_table("ha_restarts")
    op.drop_index(op.f("ix_fence_agents_host_id"), table_name="fence_agents")
    op.drop_table("fence_agents")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("pm_enabled")
