"""What a durable writer writes (its table, its insert, how its rows are named) and what it is tuned by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Table
from sqlalchemy.sql import Executable


class WriterSettings(Protocol):
    """What a writer is tuned by (AuditSettings, TaskSettings)."""

    @property
    def spool_dir(self) -> Path: ...
    @property
    def dead_letter_dir(self) -> Path | None: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def flush_interval_s(self) -> float: ...
    @property
    def write_timeout_s(self) -> float: ...
    @property
    def retry_interval_s(self) -> float: ...
    @property
    def shutdown_timeout_s(self) -> float: ...
    @property
    def startup_replay_timeout_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RowKind:
    """What a writer writes: its table, the statement that inserts a batch of rows, and how a row is named."""

    name: str  # in log lines and the writer task's name: "audit", "tasks"
    table: Table
    insert: Callable[[str], Executable]  # the batch's statement for a dialect name ("postgresql", "sqlite")
    noun: str  # a row in log lines and dead-letter stories: "request", "task"
    id_field: str  # the field that names it there: "request_id", "id"

    def label(self, row: dict[str, Any]) -> str:
        return str(row.get(self.id_field))
