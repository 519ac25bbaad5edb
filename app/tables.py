"""Every table, imported in one place so Alembic and the drift check see the whole schema."""

from sqlmodel import SQLModel

from app.audit.models import AuditRecord
from app.auth.models import ApiKey
from app.tasks.models import Task

metadata = SQLModel.metadata

__all__ = ["ApiKey", "AuditRecord", "Task", "metadata"]
