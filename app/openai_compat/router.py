"""POST /v1/chat/completions and GET /v1/models, through the same auth, model calls and metrics as tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.agent.model_call import ModelCall
from app.audit.context import AuditContext, outcome_status
from app.dependencies import PrincipalDep, ResourcesDep, authenticate
from app.enforcement.enforcer import Ticket
from app.enforcement.idempotent import run_once
from app.errors import AppError, InvalidRequest, RequestTimeout
from app.ids import new_id
from app.middleware import request_id_var
from app.openai_compat.errors import OpenAIErrorRoute, openai_error_response
from app.openai_compat.schemas import ChatCompletionRequest
from app.providers.base import LLMChunk, LLMRequest, LLMResponse
from app.providers.tokens import count_message_tokens
from app.request_body import documented_body, read_body
from app.resources import Resources
from app.streaming import EventStreamResponse
from app.tasks.router import COST_HEADER

router = APIRouter(prefix="/v1", tags=["openai-compatible"], route_class=OpenAIErrorRoute)

_DONE = b"data: [DONE]\n\n"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": "An error in OpenAI's envelope: {error: {message, type, code}}"}
    for status in (400, 401, 402, 404, 409, 422, 429, 502, 503, 504)
}


@router.get("/models", summary="List models (OpenAI-compatible)", responses=_ERRORS)
async def list_models(_principal: PrincipalDep, resources: ResourcesDep) -> Response:
    data = [
        {"id": route.name, "object": "model", "created": 0, "owned_by": route.provider.name}
        for route in resources.providers.routes()
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.post(
    "/chat/completions",
    summary="Create a chat completion (OpenAI-compatible)",
    responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}, **_ERRORS},
    # The body is read and validated by the handler itself (FastAPI's own body handling was the
    # largest cost of this, the hottest route); the schema is declared here.
    # The example's model is the deployment's own small-tier model (app/openapi.py fills it in).
    openapi_extra=documented_body(
        ChatCompletionRequest, {"model": "", "messages": [{"role": "user", "content": "What is 17 * 23 + 4?"}]}
    ),
)
async def chat_completions(request: Request) -> Response:
    # Resources, key and body by plain calls: FastAPI's dependency solving cost more than the
    # rest of this route's own work (the key requirement is still in the schema, see app/openapi.py).
    resources: Resources = request.state.resources
    principal = await authenticate(request, resources)
    body = await read_body(request, ChatCompletionRequest, resources.settings.server.max_json_depth)
    idempotency_key = request.headers.get("idempotency-key")
    if body.stream and idempotency_key is not None:
        raise InvalidRequest("Idempotency-Key applies to non-streamed requests; a stream cannot be replayed.")
    route = resources.providers.route(body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None and resources.enforcer.spec_for(principal).budget_usd is not None:
        # A budget is only safe against a bounded completion: cap what the caller left open.
        max_tokens = resources.settings.agent.default_max_tokens
    llm_request = LLMRequest(
        model=route.upstream_model,
        messages=body.messages,
        stream=body.stream,
        max_tokens=max_tokens,
        temperature=body.temperature,
        tools=body.tools,
        tool_choice=body.tool_choice,
        extra=dict(body.model_extra or {}),
        # Streamed: the upstream's own events are relayed as they come, under the public model name.
        relay_model=route.name if body.stream else None,
    )
    meta = _Meta(id="chatcmpl-" + new_id(), created=int(time.time()), model=route.name)
    timeout_s = resources.settings.agent.default_timeout_s
    prompt_tokens = count_message_tokens(llm_request.messages)
    audit: AuditContext = request.state.audit
    audit.model, audit.provider = route.name, route.provider.name
    if resources.settings.audit.store_content:
        audit.prompt = orjson.dumps(llm_request.messages).decode()[: resources.settings.audit.content_max_chars]

    async def admit() -> Ticket:
        return await resources.enforcer.admit(
            principal,
            route=route,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens or resources.settings.agent.default_max_tokens,
            scope=request.scope,
            audit=audit,
        )

    def answered(call: ModelCall) -> None:
        # A fallback may have taken the call while the requested model's breaker is open.
        meta.model = call.route.name
        audit.model, audit.provider = call.route.name, call.route.provider.name

    if not body.stream:

        async def run() -> Response:
            ticket = await admit()
            call = ModelCall(route, llm_request, resources.metrics, ticket, prompt_tokens=prompt_tokens)
            try:
                async with asyncio.timeout(timeout_s):
                    async for _chunk in call:
                        pass
            except TimeoutError:
                raise RequestTimeout(f"The completion did not finish within {timeout_s:g} s.") from None
            finally:
                await call.aclose()
                await ticket.close()
            response = call.response()
            answered(call)
            cost = f"{call.route.cost(response.usage):.9f}"
            return Response(
                orjson.dumps(_completion(meta, response)), media_type="application/json", headers={COST_HEADER: cost}
            )

        return await run_once(request, principal, resources.idempotency, idempotency_key, run, openai_error_response)

    ticket = await admit()
    call = ModelCall(route, llm_request, resources.metrics, ticket, prompt_tokens=prompt_tokens)
    deadline = asyncio.get_running_loop().time() + timeout_s
    # Wait for the first chunk before answering 200, so that an upstream that fails at once
    # gets a proper HTTP error rather than an error inside a stream.
    try:
        async with asyncio.timeout_at(deadline):
            first = await anext(call, None)
    except TimeoutError:
        await call.aclose()
        await ticket.close()
        raise RequestTimeout(f"The completion did not start within {timeout_s:g} s.") from None
    except BaseException:
        await call.aclose()
        await ticket.close()
        raise
    answered(call)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def close() -> None:
        await call.aclose()
        await ticket.close()

    return EventStreamResponse(
        _stream(call, ticket, first, meta, include_usage, deadline, audit),
        ping_seconds=resources.settings.server.sse_ping_seconds,
        active=resources.metrics.active_streams.labels("openai"),
        on_close=close,
        direct=True,  # a read's worth per frame already (the provider folds what each read brought)
    )


class _Meta:
    __slots__ = ("created", "id", "model")

    def __init__(self, id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = id, created, model

    def adopt(self, frame: bytes) -> None:
        """The id and created of a relayed upstream chunk, for the chunks of our own in the same stream."""
        try:
            upstream = orjson.loads(frame.removeprefix(b"data: "))
        except orjson.JSONDecodeError:
            return
        if isinstance(upstream, dict):
            if isinstance(upstream.get("id"), str):
                self.id = upstream["id"]
            if isinstance(upstream.get("created"), int):
                self.created = upstream["created"]

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _stream(
    call: ModelCall,
    ticket: Ticket,
    first: LLMChunk | None,
    meta: _Meta,
    include_usage: bool,
    deadline: float,
    audit: AuditContext,
) -> AsyncGenerator[bytes, None]:
    outcome = "cancelled"  # unless the stream gets to its end or to an error
    # The upstream's events come in chunk.raw (the provider relays them, under the public model
    # name): they go out as they came, a read's worth at once; only what billing needs was read from
    # them (ModelCall: text, finish reason, usage). Chunks without (a provider that cannot relay)
    # are rendered here. Our own chunks then take the upstream's id.
    relayed: bytes | None = None  # the first relayed event
    usage_frame: list[bytes] | None = None  # the upstream's usage chunk, relayed if the client asked
    bound = _Deadline(deadline)
    try:
        if first is None or first.raw is None:
            yield meta.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        chunk = first
        while chunk is not None:
            raw = chunk.raw
            if raw is None:
                for frame in _frames(meta, chunk):
                    yield frame
            elif raw:
                if relayed is None:
                    relayed = raw[0]
                if chunk.usage is not None and chunk.texts is None and not (chunk.text or chunk.tool_calls):
                    usage_frame = raw if chunk.finish_reason is None else None
                    if usage_frame is None:
                        yield b"".join(raw)
                else:
                    yield raw[0] if len(raw) == 1 else b"".join(raw)
            chunk = await bound.next(call)
        if call.cut_off:  # stopped at max_tokens: the upstream never sent its own finish_reason
            if relayed is not None:
                meta.adopt(relayed)
            yield meta.chunk([{"index": 0, "delta": {}, "finish_reason": "length"}])
        outcome = "completed"
        if include_usage:
            response = call.response()
            if usage_frame is not None and not response.usage_estimated:
                yield b"".join(usage_frame)
            else:
                if relayed is not None:
                    meta.adopt(relayed)
                yield meta.chunk([], usage=_usage(response))
        yield _DONE
    except AppError as exc:
        outcome = exc.code
        # Already streaming: report in-band, in the shape OpenAI's SDKs raise as an APIError.
        error = {"message": exc.detail, "type": "api_error", "code": exc.code, "request_id": request_id_var.get()}
        yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    finally:
        bound.stop()
        await call.aclose()
        await ticket.close()
        audit.status, audit.error_code = outcome_status(outcome)


class _Deadline:
    """Bounds each wait for the next chunk by the stream's deadline, never a yield (a suspended
    generator would carry a timeout scope into its consumer), with one timer for the whole stream
    instead of a timeout scope per chunk: when it fires during a wait, it cancels the waiting task,
    and the wait ends with RequestTimeout (a cancellation from elsewhere stays one); when it fired
    between waits, the next one fails at once."""

    __slots__ = ("_expired", "_fired", "_handle", "_waiting")

    def __init__(self, deadline: float) -> None:
        self._expired = False
        self._fired = False  # the timer cancelled the waiting task
        self._waiting: asyncio.Task[object] | None = None
        self._handle = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._waiting is not None:
            self._fired = True
            self._waiting.cancel()

    def stop(self) -> None:
        self._handle.cancel()

    async def next(self, call: ModelCall) -> LLMChunk | None:
        if self._expired:
            raise RequestTimeout("The completion did not finish within its time limit.")
        self._waiting = task = asyncio.current_task()
        try:
            chunk = await anext(call, None)
        except asyncio.CancelledError:
            if self._fired:
                self._fired = False
                if task is not None and task.uncancel() == 0:
                    raise RequestTimeout("The completion did not finish within its time limit.") from None
            raise
        finally:
            self._waiting = None
        if self._fired:  # it fired as the chunk came: the deadline has passed all the same
            self._fired = False
            if task is not None:
                task.uncancel()
            raise RequestTimeout("The completion did not finish within its time limit.")
        return chunk


def _frames(meta: _Meta, chunk: LLMChunk) -> list[bytes]:
    frames = []
    delta: dict[str, Any] = {}
    if chunk.text:
        delta["content"] = chunk.text
    if chunk.tool_calls:
        delta["tool_calls"] = [
            {
                "index": call.index,
                **({"id": call.id, "type": "function"} if call.id else {}),
                "function": {**({"name": call.name} if call.name else {}), "arguments": call.arguments},
            }
            for call in chunk.tool_calls
        ]
    if delta:
        frames.append(meta.chunk([{"index": 0, "delta": delta, "finish_reason": None}]))
    if chunk.finish_reason:
        frames.append(meta.chunk([{"index": 0, "delta": {}, "finish_reason": chunk.finish_reason}]))
    return frames


def _completion(meta: _Meta, response: LLMResponse) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response.text or None}
    if response.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in response.tool_calls
        ]
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "message": message, "finish_reason": response.finish_reason}],
        "usage": _usage(response),
    }


def _usage(response: LLMResponse) -> dict[str, int]:
    usage = response.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
