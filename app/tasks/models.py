"""The task table (one record per task, written at admission and at its end) and TaskRecord, its value object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, cast, get_args

from sqlalchemy import JSON, Column, DateTime, Index, Text
from sqlmodel import Field, SQLModel

import app.db  # noqa: F401  (sets the metadata naming convention before any table is declared)

TaskStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TASK_STATUSES: tuple[TaskStatus, ...] = get_args(TaskStatus)
ACTIVE_STATUSES: tuple[TaskStatus, ...] = ("queued", "running")
# A record is written at admission (1) and at its end (2); the store never applies a lower version than it holds.
ADMITTED_VERSION = 1
FINAL_VERSION = 2

_USD_PLACES = Decimal("0.000000001")  # the scale of task.cost_usd
ACTIVE_BACKGROUND_SQLITE = "background = 1 AND status IN ('queued', 'running')"
ACTIVE_BACKGROUND_POSTGRES = "background AND status IN ('queued', 'running')"


class Task(SQLModel, table=True):
    __tablename__ = "task"
    __table_args__ = (
        Index("ix_task_key_created", "api_key_id", "created_at"),  # a caller's tasks, newest first
        Index("ix_task_status_lease", "status", "lease_expires_at"),  # the sweep of expired leases
        Index("ix_task_created", "created_at"),  # every task, newest first; prune
        # ix_task_key_active, partial, is declared in app/tables.py: see there.
    )

    id: str = Field(max_length=64, primary_key=True)
    api_key_id: int
    status: str = Field(max_length=16)  # queued, running, completed, failed, cancelled
    background: bool = False
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    started_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    query: str = Field(sa_type=Text)
    mode: str | None = Field(default=None, max_length=16)
    tier: str | None = Field(default=None, max_length=16)
    model: str | None = Field(default=None, max_length=120)
    provider: str | None = Field(default=None, max_length=64)
    # The other request fields: context, tools, session_id, max_tokens, temperature, timeout_s.
    # none_as_null: None is SQL NULL, not the JSON value null.
    request: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    output: str | None = Field(default=None, sa_type=Text)
    # [{tool, arguments, result, error, duration_ms}], in call order.
    tool_calls: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Field(default=Decimal(0), max_digits=18, decimal_places=9)
    usage_estimated: bool = False
    error_code: str | None = Field(default=None, max_length=64)
    error_detail: str | None = Field(default=None, sa_type=Text)
    instance_id: str | None = Field(default=None, max_length=64)  # the process that runs it
    lease_expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))  # while it runs
    session_id: str | None = Field(default=None, max_length=128)  # the conversation it belongs to
    trace_id: str | None = Field(default=None, max_length=32)  # W3C trace id, 32 hex digits
    version: int


TASK_COLUMNS: tuple[str, ...] = tuple(Task.__table__.columns.keys())  # type: ignore[attr-defined]
_TIMESTAMPS = ("created_at", "started_at", "finished_at", "lease_expires_at")


@dataclass(frozen=True, slots=True)
class TaskToolCall:
    tool: str
    arguments: Any = None
    result: Any = None
    error: str | None = None
    duration_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "arguments": self.arguments,
            "result": self.result,
            "error": self.error,
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> TaskToolCall:
        return cls(
            tool=str(value.get("tool")),
            arguments=value.get("arguments"),
            result=value.get("result"),
            error=value.get("error"),
            duration_ms=float(value.get("duration_ms") or 0.0),
        )


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as one version of its record holds it; timestamps are in UTC, cost_usd exact to 9 places."""

    id: str
    api_key_id: int
    status: TaskStatus
    background: bool
    created_at: datetime
    query: str
    version: int = ADMITTED_VERSION
    started_at: datetime | None = None
    finished_at: datetime | None = None
    mode: str | None = None
    tier: str | None = None
    model: str | None = None
    provider: str | None = None
    request: dict[str, Any] | None = None
    output: str | None = None
    tool_calls: tuple[TaskToolCall, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    usage_estimated: bool = False
    error_code: str | None = None
    error_detail: str | None = None
    instance_id: str | None = None
    lease_expires_at: datetime | None = None
    session_id: str | None = None
    trace_id: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def to_row(self) -> dict[str, Any]:
        """The task table's row: every column, timestamps in UTC (SQLite compares them as text, not instants)."""
        row = {name: getattr(self, name) for name in TASK_COLUMNS}
        for name in _TIMESTAMPS:
            row[name] = _utc_or_none(row[name])
        row["tool_calls"] = [call.to_json() for call in self.tool_calls]
        return row

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> TaskRecord:
        """From a row read back (SQLite drops offsets and keeps costs as floats) or a record given as a mapping.

        Raises KeyError for a missing id, api_key_id, status, background, created_at or query, and
        ValueError for a status that is none of TASK_STATUSES.
        """
        status = row["status"]
        if status not in TASK_STATUSES:
            raise ValueError(f"status: {status!r} is none of {', '.join(TASK_STATUSES)}")
        return cls(
            id=row["id"],
            api_key_id=row["api_key_id"],
            status=cast(TaskStatus, status),
            background=bool(row["background"]),
            created_at=_utc(row["created_at"]),
            query=row["query"],
            version=row.get("version", ADMITTED_VERSION),
            started_at=_utc_or_none(row.get("started_at")),
            finished_at=_utc_or_none(row.get("finished_at")),
            mode=row.get("mode"),
            tier=row.get("tier"),
            model=row.get("model"),
            provider=row.get("provider"),
            request=row.get("request"),
            output=row.get("output"),
            tool_calls=tuple(TaskToolCall.from_json(call) for call in row.get("tool_calls") or ()),
            prompt_tokens=row.get("prompt_tokens", 0),
            completion_tokens=row.get("completion_tokens", 0),
            cost_usd=Decimal(str(row.get("cost_usd", 0))).quantize(_USD_PLACES),
            usage_estimated=bool(row.get("usage_estimated", False)),
            error_code=row.get("error_code"),
            error_detail=row.get("error_detail"),
            instance_id=row.get("instance_id"),
            lease_expires_at=_utc_or_none(row.get("lease_expires_at")),
            session_id=row.get("session_id"),
            trace_id=row.get("trace_id"),
        )


def _utc(moment: datetime) -> datetime:
    # Naive means UTC (SQLite hands timestamps back without their offset; the store writes UTC).
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)
