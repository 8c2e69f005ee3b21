"""credit holds shared by coordinator replicas

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 21:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credithold",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("client", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_credithold_client"), "credithold", ["client"], unique=False)
    op.create_index(op.f("ix_credithold_expires_at"), "credithold", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_credithold_expires_at"), table_name="credithold")
    op.drop_index(op.f("ix_credithold_client"), table_name="credithold")
    op.drop_table("credithold")
