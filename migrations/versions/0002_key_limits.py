"""key limits: per-key rate, token, concurrency and budget limits (NULL takes the default)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("rpm", "burst", "tpm", "max_concurrency", "max_tokens_per_request")


def upgrade() -> None:
    with op.batch_alter_table("api_key") as batch_op:
        for name in _COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("budget_usd", sa.Numeric(precision=18, scale=9), nullable=True))
        batch_op.add_column(sa.Column("budget_period", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch_op:
        for name in ("budget_period", "budget_usd", *reversed(_COLUMNS)):
            batch_op.drop_column(name)
