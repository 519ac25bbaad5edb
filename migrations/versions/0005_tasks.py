"""tasks: one record per task (admission and end), and each key's limit on background tasks (NULL: the default)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _text(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table(
        "task",
        sa.Column("id", _text(64), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("status", _text(16), nullable=False),
        sa.Column("background", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("mode", _text(16), nullable=True),
        sa.Column("tier", _text(16), nullable=True),
        sa.Column("model", _text(120), nullable=True),
        sa.Column("provider", _text(64), nullable=True),
        sa.Column("request", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("tool_calls", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=18, scale=9), nullable=False),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("error_code", _text(64), nullable=True),
        sa.Column("error_detail", sa.Text(), nullable=True),
        sa.Column("instance_id", _text(64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task")),
    )
    op.create_index("ix_task_key_created", "task", ["api_key_id", "created_at"])
    op.create_index("ix_task_status_lease", "task", ["status", "lease_expires_at"])
    op.create_index("ix_task_created", "task", ["created_at"])
    with op.batch_alter_table("api_key") as batch_op:
        batch_op.add_column(sa.Column("max_background_tasks", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch_op:
        batch_op.drop_column("max_background_tasks")
    op.drop_table("task")
