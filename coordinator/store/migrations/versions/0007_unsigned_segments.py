"""segments delivered unsigned (the worker died before its receipt), for receipt documents

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unsignedsegment",
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("parent_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("segment", sa.Integer(), nullable=False),
        sa.Column("client", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("worker_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("billed_prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("billed_completion_tokens", sa.Integer(), nullable=False),
        sa.Column("price_prompt_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("price_completion_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index(
        op.f("ix_unsignedsegment_parent_id"), "unsignedsegment", ["parent_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_unsignedsegment_parent_id"), table_name="unsignedsegment")
    op.drop_table("unsignedsegment")
