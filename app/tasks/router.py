"""POST /v1/tasks: runs a task and answers with its result as JSON, or streams its events as SSE."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from app.agent.events import TaskCompleted, TaskFailed, TaskResult, outcome_of
from app.agent.runner import Event, TaskSpec, run_agent
from app.agent.schemas import TaskCreate
from app.audit.context import AuditContext, audit_var, outcome_status
from app.dependencies import PrincipalDep, ResourcesDep
from app.enforcement.enforcer import Ticket
from app.enforcement.idempotent import run_once
from app.errors import InvalidRequest
from app.observability.metrics import Metrics
from app.problems import problem_response, problem_responses
from app.request_body import documented_body, read_body
from app.streaming import EventStreamResponse
from app.tasks.spec import build_task_spec

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
    spec = build_task_spec(
        body,
        settings=resources.settings,
        providers=resources.providers,
        tools=resources.tools,
        stream=stream,
        principal=principal,
    )
    spec.audit = audit = audit_var.get()
    content_chars = resources.settings.audit.content_max_chars if resources.settings.audit.store_content else 0
    if audit is not None:
        describe_task(audit, spec, body.mode, "sse" if stream else "json", content_chars)

    async def admit() -> Ticket:
        return await resources.enforcer.admit(
            principal,
            route=spec.route,
            prompt_tokens=spec.prompt_tokens or 0,
            max_tokens=spec.max_tokens,
            scope=request.scope,
            audit=audit,
        )

    if stream:
        spec.ticket = await admit()
        return EventStreamResponse(
            _sse(spec, resources.metrics, content_chars),
            ping_seconds=resources.settings.server.sse_ping_seconds,
            active=resources.metrics.active_streams.labels("sse"),
            on_close=spec.ticket.close,
        )

    async def run() -> Response:
        spec.ticket = await admit()
        try:
            return await _run_to_result(spec, resources.metrics, content_chars)
        finally:
            await spec.ticket.close()

    return await run_once(request, principal, resources.idempotency, idempotency_key, run, problem_response)


async def _run_to_result(spec: TaskSpec, metrics: Metrics, content_chars: int) -> Response:
    last: Event | None = None
    async with aclosing(run_agent(spec, metrics)) as events:
        async for event in events:
            last = event
    metrics.tasks.labels("json", outcome_of(last)).inc()
    if spec.audit is not None:
        record_task_end(spec.audit, last, content_chars)
    if isinstance(last, TaskCompleted):
        body_json = orjson.dumps(last.model_dump(mode="json", include=_RESULT_FIELDS))
        return Response(body_json, media_type="application/json", headers={COST_HEADER: f"{last.cost_usd:.9f}"})
    assert isinstance(last, TaskFailed), "the runner always ends with task.completed or task.failed"
    raise last.error


async def _sse(spec: TaskSpec, metrics: Metrics, content_chars: int) -> AsyncGenerator[bytes, None]:
    last: Event | None = None
    try:
        async with aclosing(run_agent(spec, metrics)) as events:
            async for event in events:
                last = event
                yield sse_frame(event)
    finally:
        metrics.tasks.labels("sse", outcome_of(last)).inc()
        if spec.audit is not None:
            record_task_end(spec.audit, last, content_chars)
        if spec.ticket is not None:
            await spec.ticket.close()  # the stream held its concurrency slot until now


def describe_task(audit: AuditContext, spec: TaskSpec, mode: str, transport: str, content_chars: int) -> None:
    audit.transport = transport
    audit.task_id = spec.id
    audit.mode = mode
    audit.tier = spec.tier
    audit.model = spec.route.name
    audit.provider = spec.route.provider.name
    if content_chars:
        audit.prompt = spec.query[:content_chars]


def record_task_end(audit: AuditContext, last: Event | None, content_chars: int) -> None:
    """A task's outcome in its audit row: status and code, and the model that really answered."""
    audit.status, audit.error_code = outcome_status(outcome_of(last))
    if isinstance(last, TaskCompleted):
        audit.model, audit.provider = last.model, last.provider
        if content_chars:
            audit.output = last.output[:content_chars]
