"""The task resource clients read (GET /v1/tasks/{id}, the list, 202 answers), made from a task record."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.tasks.models import TaskRecord, TaskStatus

_USD_DESCRIPTION = "US dollars as an exact decimal string with 9 decimal places, e.g. '0.000123000'"


class TaskUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TaskError(BaseModel):
    code: str
    detail: str | None


class TaskToolCallOut(BaseModel):
    tool: str
    arguments: Any = None
    result: Any = None
    error: str | None = None
    duration_ms: float


class TaskResource(BaseModel):
    id: str
    status: TaskStatus = Field(description="queued, running, completed, failed or cancelled")
    background: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    query: str
    mode: str | None
    model: str | None = Field(description="The model that answered (a fallback's, if one took over)")
    provider: str | None
    output: str | None
    tool_calls: list[TaskToolCallOut]
    usage: TaskUsage
    usage_estimated: bool
    cost_usd: str = Field(description=_USD_DESCRIPTION)
    error: TaskError | None = Field(description="Why a failed or cancelled task ended")
    session_id: str | None = Field(None, description="The session (conversation) the task was a turn of")
    trace_id: str | None = Field(
        None,
        description="The W3C trace id (32 hex digits) of the task's span, continued from the caller's"
        " traceparent when it sent one; null when tracing is off",
    )


class TaskList(BaseModel):
    data: list[TaskResource] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


def task_resource(record: TaskRecord) -> TaskResource:
    error = None
    if record.error_code is not None:
        error = TaskError(code=record.error_code, detail=record.error_detail)
    return TaskResource(
        id=record.id,
        status=record.status,
        background=record.background,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        query=record.query,
        mode=record.mode,
        model=record.model,
        provider=record.provider,
        output=record.output,
        tool_calls=[
            TaskToolCallOut(
                tool=call.tool,
                arguments=call.arguments,
                result=call.result,
                error=call.error,
                duration_ms=call.duration_ms,
            )
            for call in record.tool_calls
        ],
        usage=TaskUsage(
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens,
        ),
        usage_estimated=record.usage_estimated,
        cost_usd=f"{record.cost_usd:.9f}",
        error=error,
        session_id=record.session_id,
        trace_id=record.trace_id,
    )
