"""audit log: one row per request; admin keys may read them all

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _text(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table(
        "audit_record",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("record_uid", _text(32), nullable=False),
        sa.Column("request_id", _text(160), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("route", _text(120), nullable=False),
        sa.Column("transport", _text(16), nullable=False),
        sa.Column("task_id", _text(64), nullable=True),
        sa.Column("mode", _text(16), nullable=True),
        sa.Column("tier", _text(16), nullable=True),
        sa.Column("model", _text(120), nullable=True),
        sa.Column("provider", _text(64), nullable=True),
        sa.Column("status", _text(16), nullable=False),
        sa.Column("error_code", _text(64), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=18, scale=9), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("tool_call_count", sa.Integer(), nullable=False),
        sa.Column("tool_names", _text(1000), nullable=True),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("client_ip", _text(64), nullable=True),
        sa.Column("user_agent", _text(400), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_record")),
        sa.UniqueConstraint("record_uid", name=op.f("uq_audit_record_record_uid")),
    )
    op.create_index(op.f("ix_audit_record_request_id"), "audit_record", ["request_id"])
    op.create_index("ix_audit_record_created", "audit_record", ["created_at"])
    op.create_index("ix_audit_record_key_created", "audit_record", ["api_key_id", "created_at"])
    op.create_index(op.f("ix_audit_record_model"), "audit_record", ["model"])
    op.create_index(op.f("ix_audit_record_status"), "audit_record", ["status"])
    with op.batch_alter_table("api_key") as batch_op:
        batch_op.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch_op:
        batch_op.drop_column("is_admin")
    op.drop_table("audit_record")
