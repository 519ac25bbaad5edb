"""session and trace ids: on audit rows and task records (NULL: no session, no trace)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _text(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    for table in ("audit_record", "task"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("session_id", _text(128), nullable=True))
            batch_op.add_column(sa.Column("trace_id", _text(32), nullable=True))


def downgrade() -> None:
    for table in ("task", "audit_record"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("trace_id")
            batch_op.drop_column("session_id")
