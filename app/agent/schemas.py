"""The task request body."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.config import Mode, Tier

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"  # 1-128 letters, digits, '.', '_', ':', '-'
SESSION_ID_MAX = 128
SessionId = Annotated[str, Field(min_length=1, max_length=SESSION_ID_MAX, pattern=SESSION_ID_PATTERN)]


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=200_000, description="What the agent should do.")
    mode: Mode = Field("simple", description="simple -> small tier, complex -> medium, research -> large.")
    model_tier: Tier | None = Field(None, description="Overrides the tier chosen from mode.")
    model: str | None = Field(None, description="A configured model name; overrides mode and tier.")
    context: dict[str, Any] | None = Field(
        None, description="Facts for the agent; `context.model_tier` overrides the tier too."
    )
    tools: list[str] | None = Field(None, description="Allowlist of tools for this task (default: all).")
    session_id: SessionId | None = Field(
        None,
        description="A conversation of this key: the task is sent its earlier turns and appends its own "
        "(one turn at a time: 409 session_busy); sandboxed Python runs keep a /workspace in it too.",
    )
    max_tokens: int | None = Field(None, ge=1, description="Completion tokens per model call.")
    temperature: float | None = Field(None, ge=0, le=2)
    timeout_s: float | None = Field(None, ge=1, le=3600, description="Wall-clock limit for the whole task, in seconds.")
    stream: bool = Field(False, description="Stream events as SSE (also chosen by Accept: text/event-stream).")
    background: bool = Field(
        False,
        description="Run detached from the connection: 202 with the task (or its SSE stream, with `stream`); "
        "follow it with GET /v1/tasks/{id}/events.",
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be blank")
        return value
