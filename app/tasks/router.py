"""POST /v1/tasks: runs a task and answers with its result as JSON, or streams its events as SSE."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.agent.events import TaskCompleted, TaskFailed, TaskResult, outcome_of
from app.agent.runner import Event, run_agent
from app.agent.schemas import TaskCreate
from app.dependencies import PrincipalDep, ResourcesDep
from app.observability.metrics import Metrics
from app.problems import PROBLEM_JSON
from app.streaming import EventStreamResponse
from app.tasks.spec import build_task_spec

router = APIRouter(prefix="/v1", tags=["tasks"])

_PROBLEM: dict[str, Any] = {"content": {PROBLEM_JSON: {}}, "description": "A problem+json error"}
_RESULT_FIELDS = set(TaskResult.model_fields)


def sse_frame(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.encode(), event.model_dump_json().encode())


@router.post(
    "/tasks",
    response_model=TaskResult,
    summary="Run a task",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The result, or its events as SSE"},
        **{status: _PROBLEM for status in (400, 401, 404, 413, 422, 502, 503, 504)},
    },
)
async def create_task(
    body: TaskCreate, request: Request, _principal: PrincipalDep, resources: ResourcesDep
) -> Response:
    stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
    spec = build_task_spec(
        body, settings=resources.settings, providers=resources.providers, tools=resources.tools, stream=stream
    )
    events = run_agent(spec, resources.metrics)
    if stream:
        return EventStreamResponse(
            _sse(events, resources.metrics),
            ping_seconds=resources.settings.server.sse_ping_seconds,
            active=resources.metrics.active_streams.labels("sse"),
        )

    last: Event | None = None
    async with aclosing(events):
        async for event in events:
            last = event
    resources.metrics.tasks.labels("json", outcome_of(last)).inc()
    if isinstance(last, TaskCompleted):
        body_json = orjson.dumps(last.model_dump(mode="json", include=_RESULT_FIELDS))
        return Response(body_json, media_type="application/json")
    assert isinstance(last, TaskFailed), "the runner always ends with task.completed or task.failed"
    raise last.error


async def _sse(events: AsyncGenerator[Event, None], metrics: Metrics) -> AsyncGenerator[bytes, None]:
    last: Event | None = None
    try:
        async with aclosing(events):
            async for event in events:
                last = event
                yield sse_frame(event)
    finally:
        metrics.tasks.labels("sse", outcome_of(last)).inc()
