"""image transfers (ISO uploads) and the verified content size of image disks

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_disks") as batch:
        batch.add_column(sa.Column("content_size", sa.BigInteger(), server_default="0",
                                   nullable=False))
    op.create_table(
        "image_transfers",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("disk_id", sa.String(length=36), nullable=False),
        sa.Column("active_disk_id", sa.String(length=36), nullable=True),
        sa.Column("host_id", sa.String(length=36), nullable=True),
        sa.Column("direction", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=False),
        sa.Column("ticket", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("transferred", sa.BigInteger(), nullable=False),
        sa.Column("inactivity_timeout", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("message", sa.String(length=1000), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("correlation_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_transfers")),
        sa.UniqueConstraint("active_disk_id", name=op.f("uq_image_transfers_active_disk_id")),
        sa.UniqueConstraint("ticket", name=op.f("uq_image_transfers_ticket")),
    )
    op.create_index(op.f("ix_image_transfers_disk_id"), "image_transfers", ["disk_id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_image_transfers_disk_id"), table_name="image_transfers")
    op.drop_table("image_transfers")
    with op.batch_alter_table("base_disks") as batch:
        batch.drop_column("content_size")
