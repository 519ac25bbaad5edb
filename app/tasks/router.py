"""POST /v1/tasks: runs a task and answers with its result as JSON, or streams its events as SSE."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from app.agent.events import TaskCompleted, TaskFailed, TaskResult
from app.agent.runner import Event
from app.agent.schemas import TaskCreate
from app.audit.context import AuditContext
from app.dependencies import PrincipalDep, ResourcesDep
from app.enforcement.idempotent import run_once
from app.errors import InvalidRequest
from app.problems import problem_response, problem_responses
from app.request_body import documented_body, read_body
from app.streaming import EventStreamResponse
from app.tasks.service import AdmittedTask

router = APIRouter(prefix="/v1", tags=["tasks"])

_RESULT_FIELDS = set(TaskResult.model_fields)
COST_HEADER = "x-pacemaker-cost-usd"


def sse_frame(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.encode(), event.model_dump_json().encode())


@router.post(
    "/tasks",
    response_model=TaskResult,
    summary="Run a task",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The result, or its events as SSE"},
        **problem_responses(400, 401, 402, 403, 404, 409, 413, 422, 429, 502, 503, 504),
    },
    openapi_extra=documented_body(TaskCreate, {"query": "What is 17 * 23 + 4?"}),
)
async def create_task(
    request: Request,
    principal: PrincipalDep,
    resources: ResourcesDep,
    idempotency_key: Annotated[
        str | None, Header(description="Run at most once per key; repeats get the stored result (non-streamed).")
    ] = None,
) -> Response:
    # Read here, after the key was checked, by the one strict parser (app/request_body.py).
    body = await read_body(request, TaskCreate, resources.settings.server.max_json_depth)
    stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
    if stream and idempotency_key is not None:
        raise InvalidRequest("Idempotency-Key applies to non-streamed requests; a stream cannot be replayed.")
    service = resources.tasks
    audit: AuditContext = request.state.audit  # made by the audit middleware for every request
    transport = "sse" if stream else "json"

    async def admit() -> AdmittedTask:
        return await service.admit(
            principal, body, transport=transport, audit=audit, stream=stream, scope=request.scope
        )

    if stream:
        task = await admit()
        return EventStreamResponse(
            _sse(service.run(task)),
            ping_seconds=resources.settings.server.sse_ping_seconds,
            active=resources.metrics.active_streams.labels("sse"),
            # Also when the events never started (a client gone before the headers were out).
            on_close=lambda: service.close(task),
        )

    async def run() -> Response:
        return await _result(service.run(await admit()))

    return await run_once(request, principal, resources.idempotency, idempotency_key, run, problem_response)


async def _result(events: AsyncGenerator[Event, None]) -> Response:
    last: Event | None = None
    async with aclosing(events):
        async for event in events:
            last = event
    if isinstance(last, TaskCompleted):
        body_json = orjson.dumps(last.model_dump(mode="json", include=_RESULT_FIELDS))
        return Response(body_json, media_type="application/json", headers={COST_HEADER: f"{last.cost_usd:.9f}"})
    assert isinstance(last, TaskFailed), "the runner always ends with task.completed or task.failed"
    raise last.error


async def _sse(events: AsyncGenerator[Event, None]) -> AsyncGenerator[bytes, None]:
    async with aclosing(events):
        async for event in events:
            yield sse_frame(event)
