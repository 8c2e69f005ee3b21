"""Files API and Batch API: files, batches and their lines

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "storedfile",
        sa.Column("id", _S(length=64), nullable=False),
        sa.Column("client", _S(length=200), nullable=False),
        sa.Column("purpose", _S(length=32), nullable=False),
        sa.Column("filename", _S(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", _S(length=64), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_storedfile_client", "storedfile", ["client"])
    op.create_table(
        "batchjob",
        sa.Column("id", _S(length=64), nullable=False),
        sa.Column("client", _S(length=200), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("endpoint", _S(length=64), nullable=False),
        sa.Column("model", _S(length=200), nullable=False),
        sa.Column("input_file_id", _S(length=64), nullable=False),
        sa.Column("completion_window", _S(length=16), nullable=False),
        sa.Column("status", _S(length=16), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("output_file_id", _S(length=64), nullable=True),
        sa.Column("error_file_id", _S(length=64), nullable=True),
        sa.Column("stop_reason", _S(length=64), nullable=True),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("expires_at", _T(), nullable=False),
        sa.Column("in_progress_at", _T(), nullable=True),
        sa.Column("finalizing_at", _T(), nullable=True),
        sa.Column("completed_at", _T(), nullable=True),
        sa.Column("expired_at", _T(), nullable=True),
        sa.Column("cancelling_at", _T(), nullable=True),
        sa.Column("cancelled_at", _T(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batchjob_client", "batchjob", ["client"])
    op.create_index("ix_batchjob_status", "batchjob", ["status"])
    op.create_table(
        "batchline",
        sa.Column("batch_id", _S(length=64), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", _S(length=512), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("request_id", _S(length=64), nullable=False),
        sa.Column("state", _S(length=16), nullable=False),
        sa.Column("owner", _S(length=200), nullable=True),
        sa.Column("lease_until", _T(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("finished_at", _T(), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", "line"),
    )
    op.create_index("ix_batchline_state", "batchline", ["state"])


def downgrade() -> None:
    op.drop_index("ix_batchline_state", table_name="batchline")
    op.drop_table("batchline")
    op.drop_index("ix_batchjob_status", table_name="batchjob")
    op.drop_index("ix_batchjob_client", table_name="batchjob")
    op.drop_table("batchjob")
    op.drop_index("ix_storedfile_client", table_name="storedfile")
    op.drop_table("storedfile")
