"""Policies (versions and who runs them), and the policy version each receipt ran under

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 19:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "policyversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", _S(length=100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", _S(length=64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_policyversion_name", "policyversion", ["name"])
    op.create_index("ix_policyversion_sha256", "policyversion", ["sha256"])
    op.create_table(
        "policyattachment",
        sa.Column("subject", _S(length=220), nullable=False),
        sa.Column("policy", _S(length=100), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("subject"),
    )
    for table in ("storedreceipt", "unsignedsegment"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("policy_sha256", _S(length=64), nullable=False, server_default="")
            )


def downgrade() -> None:
    for table in ("storedreceipt", "unsignedsegment"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("policy_sha256")
    op.drop_table("policyattachment")
    op.drop_index("ix_policyversion_sha256", table_name="policyversion")
    op.drop_index("ix_policyversion_name", table_name="policyversion")
    op.drop_table("policyversion")
