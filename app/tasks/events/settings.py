"""The `events` settings section: where task event logs live, how long they are kept and their bounds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EventsSettings(BaseModel):
    # A misspelt setting is an error, not silently ignored (as in every app.config section).
    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(
        None, description="Redis Streams for task events, shared by every instance (default: limits.redis_url)."
    )
    retention_s: float = Field(86_400.0, gt=0, description="How long a task's events are kept after it ends.")
    max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="In memory: all stored events. With Redis: events this instance has not yet written.",
    )
    max_events_per_task: int = Field(
        100_000, ge=1, description="A task keeps its newest events beyond this (approximately, on Redis)."
    )
    batch_ms: float = Field(25.0, gt=0, description="Redis: the longest an event waits for its batch.")
    batch_events: int = Field(32, ge=1, description="Redis: a batch is sent once it holds this many events.")
    redis_give_up_s: float = Field(
        10.0, gt=0, description="Redis: how long a batch is retried before it is dropped (and a reader gets 410)."
    )
