"""The /v1/tasks routes: run a task (JSON, SSE, or in the background), list, look up, cancel, follow its events."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response

from app.agent.events import TaskCompleted, TaskFailed, TaskResult, TokenDelta
from app.agent.runner import Event, TaskSpec
from app.agent.schemas import TaskCreate
from app.audit.context import AuditContext
from app.audit.router import instant
from app.dependencies import PrincipalDep, ResourcesDep, authenticate
from app.enforcement.idempotent import run_once
from app.errors import Forbidden, InvalidRequest, MalformedResume
from app.problems import problem_response, problem_responses
from app.request_body import documented_body, read_body
from app.resources import Resources
from app.streaming import EventStreamResponse
from app.tasks.events import LoggedEvent
from app.tasks.models import TaskStatus
from app.tasks.resource import TaskList, TaskResource, task_resource
from app.tasks.service import AdmittedTask
from app.tasks.store import TaskFilters

router = APIRouter(prefix="/v1", tags=["tasks"])

TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The task's id")]

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
        202: {"model": TaskResource, "description": "A background task, accepted; Location names it"},
        **problem_responses(400, 401, 402, 403, 404, 409, 413, 422, 429, 502, 503, 504),
    },
    openapi_extra=documented_body(TaskCreate, {"query": "What is 17 * 23 + 4?"}),
)
async def create_task(
    request: Request,
    principal: PrincipalDep,
    resources: ResourcesDep,
    idempotency_key: Annotated[
        str | None,
        Header(description="Run at most once per key; repeats get the stored answer (non-streamed, or background)."),
    ] = None,
) -> Response:
    # Read here, after the key was checked, by the one strict parser (app/request_body.py).
    body = await read_body(request, TaskCreate, resources.settings.server.max_json_depth)
    stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
    if stream and idempotency_key is not None and not body.background:
        raise InvalidRequest("Idempotency-Key applies to non-streamed requests; a stream cannot be replayed.")
    service = resources.tasks
    audit: AuditContext = request.state.audit  # made by the audit middleware for every request
    transport = "sse" if stream else "json"

    async def admit() -> AdmittedTask:
        return await service.admit(
            principal, body, transport=transport, audit=audit, stream=stream, scope=request.scope
        )

    if body.background:

        async def accept() -> Response:
            task = await admit()
            await resources.background.start(task)  # from here it runs whatever becomes of this connection
            if stream:
                return _event_stream(resources, await resources.background.follow(task.id, 0))
            resource = task_resource(task.record).model_dump(mode="json")
            return Response(
                orjson.dumps(resource), status_code=202, media_type="application/json", headers=_location(task.id)
            )

        if stream:
            return await accept()
        return await run_once(request, principal, resources.idempotency, idempotency_key, accept, problem_response)

    if stream:
        task = await admit()
        return EventStreamResponse(
            _sse(service.run(task), task.spec),
            ping_seconds=resources.settings.server.sse_ping_seconds,
            active=resources.metrics.active_streams.labels("sse"),
            # Also when the events never started (a client gone before the headers were out).
            on_close=lambda: service.close(task),
            direct=True,  # the token deltas of one upstream read come as one frame (TaskSpec.burst)
        )

    async def run() -> Response:
        return await _result(service.run(await admit()))

    return await run_once(request, principal, resources.idempotency, idempotency_key, run, problem_response)


async def create_task_directly(request: Request) -> Response:
    """create_task with its dependencies by plain calls, as FastAPI would solve them (for the fast path,
    app/fast_path.py: dependency solving was 5 % of a streamed task's CPU)."""
    resources: Resources = request.state.resources
    principal = await authenticate(request, resources)
    return await create_task(request, principal, resources, request.headers.get("idempotency-key"))


@router.get(
    "/tasks",
    response_model=TaskList,
    summary="Your tasks, newest first",
    responses=problem_responses(401, 403, 422, 503),
)
async def list_tasks(
    principal: PrincipalDep,
    resources: ResourcesDep,
    status: Annotated[TaskStatus | None, Query(description="Only tasks in this state")] = None,
    since: Annotated[datetime | None, Query(description="created_at at or after this (ISO 8601; naive is UTC)")] = None,
    until: Annotated[datetime | None, Query(description="created_at before this (ISO 8601; naive is UTC)")] = None,
    api_key_id: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Admin keys: another key's tasks (default: all keys)")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="The next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Tasks per page")] = 100,
) -> TaskList:
    if api_key_id is not None and not principal.is_admin:
        raise Forbidden("Listing another key's tasks takes an admin key.")
    owner = api_key_id if principal.is_admin else principal.key_id
    filters = TaskFilters(api_key_id=owner, status=status, since=instant("since", since), until=instant("until", until))
    page = await resources.tasks.store.page(filters, cursor, limit)
    return TaskList(data=[task_resource(record) for record in page.records], next_cursor=page.next_cursor)


@router.get(
    "/tasks/{task_id}",
    response_model=TaskResource,
    summary="A task: its state, and its result once it has ended",
    responses=problem_responses(401, 404, 422, 503),
)
async def get_task(task_id: TaskId, principal: PrincipalDep, resources: ResourcesDep) -> TaskResource:
    return task_resource(await resources.tasks.lookup(principal, task_id))


@router.post(
    "/tasks/{task_id}/cancel",
    response_model=TaskResource,
    summary="Cancel a queued or running task, wherever it runs",
    responses=problem_responses(401, 404, 409, 422, 503),
)
async def cancel_task(task_id: TaskId, principal: PrincipalDep, resources: ResourcesDep) -> TaskResource:
    return task_resource(await resources.tasks.cancel(principal, task_id))


@router.get(
    "/tasks/{task_id}/events",
    summary="A background task's events as SSE: those stored, then live; resume with Last-Event-ID",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The events, ending after the terminal one"},
        **problem_responses(400, 401, 404, 409, 410, 422, 503),
    },
)
async def task_events(
    task_id: TaskId,
    principal: PrincipalDep,
    resources: ResourcesDep,
    after: Annotated[str | None, Query(description="Only events with a greater seq (a non-negative integer)")] = None,
    last_event_id: Annotated[
        str | None, Header(description="The last seq received: resume after it (wins over `after`)")
    ] = None,
) -> Response:
    start = _resume_point(last_event_id if last_event_id is not None else after)
    events = await resources.background.follow_for(principal, task_id, start)
    return _event_stream(resources, events)


def _event_stream(resources: Resources, events: AsyncIterator[LoggedEvent]) -> EventStreamResponse:
    return EventStreamResponse(
        _logged_frames(events),
        ping_seconds=resources.settings.server.sse_ping_seconds,
        active=resources.metrics.active_streams.labels("sse"),
    )


async def _logged_frames(events: AsyncIterator[LoggedEvent]) -> AsyncGenerator[bytes, None]:
    try:
        async for event in events:
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.encode(), event.data)
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _resume_point(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not (len(value) <= 18 and value.isdigit()):
        raise MalformedResume("Last-Event-ID and after must be a non-negative integer (an event's seq).")
    return int(value)


def _location(task_id: str) -> dict[str, str]:
    return {"Location": f"/v1/tasks/{task_id}"}


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


async def _sse(events: AsyncGenerator[Event, None], spec: TaskSpec | None = None) -> AsyncGenerator[bytes, None]:
    """The events as SSE frames; with the task's spec, the token deltas of one upstream read as one."""
    task_id: str | None = None
    token_frame = b""  # the task's token.delta frame with its id filled in: seq, seq, delta to go
    burst: list[bytes] = []  # token frames the runner has more of right behind
    async with aclosing(events):
        async for event in events:
            if type(event) is TokenDelta:  # most of a stream's events: rendered from a template
                if event.task_id != task_id:
                    task_id = event.task_id
                    token_frame = _token_frame(task_id)
                frame = token_frame % (event.seq, event.seq, orjson.dumps(event.delta))
                if spec is not None and spec.burst > 0:
                    burst.append(frame)
                    continue
                if burst:
                    burst.append(frame)
                    frame, burst = b"".join(burst), []
                yield frame
            else:
                if burst:
                    yield b"".join(burst)
                    burst = []
                yield sse_frame(event)
        if burst:
            yield b"".join(burst)


def _token_frame(task_id: str) -> bytes:
    """sse_frame(TokenDelta(...)) as a %-template: the same bytes model_dump_json makes (tested)."""
    quoted = orjson.dumps(task_id).replace(b"%", b"%%")
    return b'id: %%d\nevent: token.delta\ndata: {"type":"token.delta","task_id":%s,"seq":%%d,"delta":%%s}\n\n' % quoted
