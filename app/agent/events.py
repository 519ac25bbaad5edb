"""Typed task events: what the runner yields and every transport renders, unchanged."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from app.errors import AppError


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallRecord(BaseModel):
    call_id: str
    tool: str
    arguments: Any
    result: Any = None
    error: str | None = None
    duration_ms: float


class SessionOutcome(BaseModel):
    """A task's session: how many earlier turns it was sent, and whether its own turn was stored."""

    id: str = Field(description="The session_id")
    history_turns: int = Field(description="Earlier turns sent to the model, after the system prompt")
    turns_left_out: int = Field(description="Older turns left out to fit the model's context")
    stored: bool = Field(description="This turn was appended to the session")
    reason: Literal["turn_too_large", "store_unavailable", "hold_expired"] | None = Field(
        None,
        description="Why it was not: larger than sessions.max_session_bytes alone, the store failed, or the "
        "task outlived its hold on the session and another turn took it",
    )


class TaskResult(BaseModel):
    id: str
    status: Literal["completed"] = "completed"
    output: str
    tool_calls: list[ToolCallRecord]
    usage: UsageOut
    usage_estimated: bool = False
    cost_usd: float
    model: str
    provider: str
    tier: str | None = None
    finish_reason: str
    duration_ms: float
    session: SessionOutcome | None = Field(None, description="Tasks with a session_id: its history and this turn")


class _Event(BaseModel):
    type: str
    task_id: str
    seq: int


class TaskStarted(_Event):
    type: Literal["task.started"] = "task.started"
    model: str
    provider: str
    tier: str | None


class SessionTruncated(_Event):
    """The session's oldest turns did not fit the model's context with the query and max_tokens: left out."""

    type: Literal["session.truncated"] = "session.truncated"
    session_id: str
    turns_left_out: int
    turns_sent: int


class ModelFallback(_Event):
    """The model's circuit breaker is open: the task goes on with the configured fallback model."""

    type: Literal["model.fallback"] = "model.fallback"
    model: str
    fallback: str
    reason: str


class TokenDelta(_Event):
    type: Literal["token.delta"] = "token.delta"
    delta: str


class ToolCallStarted(_Event):
    type: Literal["tool.call"] = "tool.call"
    call_id: str
    tool: str
    arguments: Any


class ToolCallFinished(_Event):
    type: Literal["tool.result"] = "tool.result"
    call_id: str
    tool: str
    result: Any = None
    error: str | None = None
    duration_ms: float


class TaskCompleted(TaskResult, _Event):
    type: Literal["task.completed"] = "task.completed"


class TaskFailed(_Event):
    type: Literal["task.failed"] = "task.failed"
    code: str
    detail: str
    retryable: bool
    status: int = Field(description="The HTTP status a non-streamed request gets for this failure.")
    # The error itself (with its headers, e.g. Retry-After), for transports that answer in HTTP.
    _error: AppError | None = PrivateAttr(default=None)

    @property
    def error(self) -> AppError:
        return self._error or AppError(self.detail)

    @error.setter
    def error(self, value: AppError) -> None:
        self._error = value


TaskEvent = Annotated[
    TaskStarted
    | SessionTruncated
    | ModelFallback
    | TokenDelta
    | ToolCallStarted
    | ToolCallFinished
    | TaskCompleted
    | TaskFailed,
    Field(discriminator="type"),
]
TERMINAL_EVENTS = (TaskCompleted, TaskFailed)


def outcome_of(last: _Event | None) -> str:
    """How a task ended, from its last event: completed, a failure code, or cancelled (no end event)."""
    if isinstance(last, TaskCompleted):
        return "completed"
    return last.code if isinstance(last, TaskFailed) else "cancelled"
