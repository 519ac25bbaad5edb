"""task active index: a partial index on a key's queued or running background tasks (counted at admission)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As app/tasks/models.py has them: each as its dialect renders the count's WHERE.
SQLITE = "background = 1 AND status IN ('queued', 'running')"
POSTGRES = "background AND status IN ('queued', 'running')"


def upgrade() -> None:
    op.create_index(
        "ix_task_key_active",
        "task",
        ["api_key_id"],
        sqlite_where=sa.text(SQLITE),
        postgresql_where=sa.text(POSTGRES),
    )


def downgrade() -> None:
    op.drop_index("ix_task_key_active", table_name="task")
