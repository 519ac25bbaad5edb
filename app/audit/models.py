"""The audit_record table: one row per request Pacemaker saw, whatever became of it."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, Text
from sqlmodel import Field, SQLModel

import app.db  # noqa: F401  (sets the metadata naming convention before any table is declared)


class AuditRecord(SQLModel, table=True):
    __tablename__ = "audit_record"
    __table_args__ = (
        Index("ix_audit_record_key_created", "api_key_id", "created_at"),
        Index("ix_audit_record_created", "created_at"),
    )

    # BigInteger: an audit log outgrows 32-bit ids; on SQLite only INTEGER is the autoincrementing rowid.
    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    )
    # The row's own id, made by the server: a batch written twice is recognised by it and ignored.
    record_uid: str = Field(max_length=32, unique=True)
    # The x-request-id. Not unique: a client may send its own ids, and reusing one must not hide a
    # request from the log.
    request_id: str = Field(max_length=160, index=True)
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    finished_at: datetime = Field(sa_type=DateTime(timezone=True))
    api_key_id: int | None = None
    route: str = Field(max_length=120)
    transport: str = Field(max_length=16)  # json, sse, ws, openai, tool, http
    task_id: str | None = Field(default=None, max_length=64)
    mode: str | None = Field(default=None, max_length=16)
    tier: str | None = Field(default=None, max_length=16)
    model: str | None = Field(default=None, max_length=120, index=True)
    provider: str | None = Field(default=None, max_length=64)
    status: str = Field(max_length=16, index=True)  # completed, failed, rejected, cancelled, timeout
    error_code: str | None = Field(default=None, max_length=64)
    http_status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    cost_usd: Decimal = Field(default=Decimal(0), max_digits=18, decimal_places=9)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    tool_call_count: int = 0
    tool_names: str | None = Field(default=None, max_length=1000)  # comma-separated, in call order
    retries: int = 0
    client_ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=400)
    session_id: str | None = Field(default=None, max_length=128)  # the conversation the task belonged to
    trace_id: str | None = Field(default=None, max_length=32)  # W3C trace id, 32 hex digits
    prompt: str | None = Field(default=None, sa_type=Text)
    output: str | None = Field(default=None, sa_type=Text)
