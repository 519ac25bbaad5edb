"""Every table, imported in one place so Alembic and the drift check see the whole schema."""

from sqlalchemy import Index, text
from sqlmodel import SQLModel

from app.audit.models import AuditRecord
from app.auth.models import ApiKey
from app.tasks.models import ACTIVE_BACKGROUND_POSTGRES, ACTIVE_BACKGROUND_SQLITE, Task

metadata = SQLModel.metadata

# A key's active background tasks, counted at each background admission: without it SQLite read
# every task the key ever ran (8.8 ms at 50,000). Each predicate as its dialect renders the count's
# WHERE, so that the planner sees it implied. Declared here, where only migrations and the drift
# check look, not with the table: a postgresql_ argument loads SQLAlchemy's PostgreSQL dialect
# (2.3 MB) in every process, and the server never creates an index.
Index(
    "ix_task_key_active",
    Task.__table__.c.api_key_id,  # type: ignore[attr-defined]
    sqlite_where=text(ACTIVE_BACKGROUND_SQLITE),
    postgresql_where=text(ACTIVE_BACKGROUND_POSTGRES),
)

__all__ = ["ApiKey", "AuditRecord", "Task", "metadata"]
