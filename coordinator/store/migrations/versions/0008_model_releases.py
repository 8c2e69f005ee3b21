"""model releases: public model names, their versions, and the release history

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "modelrelease",
        sa.Column("name", _S(length=200), nullable=False),
        sa.Column("stable", _S(length=100), nullable=False),
        sa.Column("sticky", sa.Boolean(), nullable=False),
        sa.Column("shadow_version", _S(length=100), nullable=True),
        sa.Column("shadow_share", sa.Float(), nullable=False),
        sa.Column("rollback", sa.Text(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "modelversion",
        sa.Column("model", _S(length=200), nullable=False),
        sa.Column("version", _S(length=100), nullable=False),
        sa.Column("serves", _S(length=200), nullable=False),
        sa.Column("adapter_sha256", _S(length=64), nullable=True),
        sa.Column("tokenizer_sha256", _S(length=64), nullable=True),
        sa.Column("max_price_prompt_per_mtok", sa.BigInteger(), nullable=True),
        sa.Column("max_price_completion_per_mtok", sa.BigInteger(), nullable=True),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("state", _S(length=20), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("model", "version"),
    )
    op.create_table(
        "releaseevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", _S(length=200), nullable=False),
        sa.Column("version", _S(length=100), nullable=False),
        sa.Column("kind", _S(length=40), nullable=False),
        sa.Column("actor", _S(length=200), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_releaseevent_model"), "releaseevent", ["model"], unique=False)
    op.create_index(op.f("ix_releaseevent_at"), "releaseevent", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_releaseevent_at"), table_name="releaseevent")
    op.drop_index(op.f("ix_releaseevent_model"), table_name="releaseevent")
    op.drop_table("releaseevent")
    op.drop_table("modelversion")
    op.drop_table("modelrelease")
