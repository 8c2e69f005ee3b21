"""Requests answered from the response cache, with their signed statements

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "cachehitrecord",
        sa.Column("request_id", _S(length=64), nullable=False),
        sa.Column("client", _S(length=200), nullable=False),
        sa.Column("source_request_id", _S(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index("ix_cachehitrecord_client", "cachehitrecord", ["client"])


def downgrade() -> None:
    op.drop_index("ix_cachehitrecord_client", table_name="cachehitrecord")
    op.drop_table("cachehitrecord")
