"""The api_key table. Only a SHA-256 of each key is stored, never the key itself."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import JSON, DateTime
from sqlmodel import Field, SQLModel

import app.db  # noqa: F401  (sets the metadata naming convention before any table is declared)


def utcnow() -> datetime:
    return datetime.now(UTC)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    # The first characters of the key, shown in listings so a person can tell keys apart.
    prefix: str = Field(max_length=16, index=True)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    # Limits of this key; None takes the default from Settings.limits.
    rpm: int | None = None
    burst: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    max_tokens_per_request: int | None = None
    budget_usd: Decimal | None = Field(default=None, max_digits=18, decimal_places=9)
    budget_period: str | None = Field(default=None, max_length=8)
    max_background_tasks: int | None = None
    # May read every key's audit rows (GET /v1/audit).
    is_admin: bool = False
    # The tools this key may use (None: all); its ceilings on sandbox limits ({timeout_s, memory_mb, fuel}).
    allowed_tools: list[str] | None = Field(default=None, sa_type=JSON)
    sandbox_limits: dict[str, float] | None = Field(default=None, sa_type=JSON)
