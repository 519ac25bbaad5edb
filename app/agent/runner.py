"""The agent loop: model call -> tool calls -> model call ..., as an async generator of TaskEvents.

The runner knows nothing of transports. It never yields from inside a timeout scope (a suspended
generator would carry the scope into its consumer); instead every await is bounded by the task's
deadline on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from app.agent.control import RunControl
from app.agent.events import (
    ModelFallback,
    SessionTruncated,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    TokenDelta,
    ToolCallFinished,
    ToolCallRecord,
    ToolCallStarted,
    UsageOut,
)
from app.agent.model_call import ModelCall
from app.enforcement.enforcer import Ticket
from app.errors import AppError, CircuitOpen, MaxIterationsExceeded, RequestTimeout
from app.observability.metrics import Metrics
from app.providers.base import LLMRequest, Message, ToolCall, Usage
from app.providers.registry import ModelRoute
from app.tools.base import Tool, ToolContext, ToolError
from app.tools.invoke import ToolInvoker

log = logging.getLogger(__name__)

T = TypeVar("T")
Event = (
    TaskStarted
    | SessionTruncated
    | ModelFallback
    | TokenDelta
    | ToolCallStarted
    | ToolCallFinished
    | TaskCompleted
    | TaskFailed
)


@dataclass(slots=True)
class History:
    """The earlier turns of the task's session that fit its model's context, sent before the query."""

    session_id: str
    messages: list[Message]
    turns: int
    left_out: int  # older turns that did not fit


@dataclass(slots=True)
class TaskSpec:
    id: str
    query: str
    route: ModelRoute
    tier: str | None
    tools: list[Tool]
    system_prompt: str
    max_tokens: int
    max_iterations: int
    timeout_s: float
    stream: bool  # stream from the upstream (worth it only when the client streams)
    temperature: float | None = None
    context: dict[str, Any] | None = None
    ticket: Ticket | None = None  # the admitted request, which pays for each model call
    tool_context: ToolContext = field(default_factory=ToolContext)
    # The estimated tokens of the initial conversation: counted once, for admission and the first call.
    prompt_tokens: int | None = None
    max_parallel_tools: int = 4  # tool calls of one model turn that run at once
    history: History | None = None
    # This task's turn as the runner builds it, for its session: the query, each assistant message
    # with tool calls and each tool result, then the answer.
    turn: list[Message] = field(default_factory=list)
    control: RunControl = field(init=False)  # its deadline, and cancel()
    # While a token.delta is out: how many more the runner yields right after it, with no wait between
    # (the rest of one upstream read). A renderer may write them in one go.
    burst: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.control = RunControl(self.timeout_s)

    @property
    def tools_by_name(self) -> dict[str, Tool]:
        return {tool.name: tool for tool in self.tools}


@dataclass(slots=True)
class _Progress:
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal = Decimal(0)
    usage_estimated: bool = False
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


async def run_agent(spec: TaskSpec, metrics: Metrics, tools: ToolInvoker) -> AsyncGenerator[Event, None]:
    progress = _Progress()
    started = time.perf_counter()
    spec.control.start()
    try:
        yield TaskStarted(
            task_id=spec.id,
            seq=progress.next_seq(),
            model=spec.route.name,
            provider=spec.route.provider.name,
            tier=spec.tier,
        )
        history = spec.history
        if history is not None and history.left_out:
            yield SessionTruncated(
                task_id=spec.id,
                seq=progress.next_seq(),
                session_id=history.session_id,
                turns_left_out=history.left_out,
                turns_sent=history.turns,
            )
        try:
            # aclosing: if our consumer goes away, the inner loop (and its upstream call) closes now.
            async with aclosing(_loop(spec, progress, metrics, tools, started)) as events:
                async for event in events:
                    yield event
        except TimeoutError:
            yield _failed(spec, progress, RequestTimeout(f"The task did not finish within {spec.timeout_s:g} s."))
        except AppError as exc:
            yield _failed(spec, progress, exc)
        except Exception:
            log.exception("task %s failed unexpectedly", spec.id)
            yield _failed(spec, progress, AppError("The task failed on an internal error."))
    finally:
        spec.control.stop()


async def _loop(
    spec: TaskSpec, progress: _Progress, metrics: Metrics, tools: ToolInvoker, started: float
) -> AsyncGenerator[Event, None]:
    messages = initial_messages(spec)
    spec.turn = messages[-1:]
    definitions = [tool.openai_definition() for tool in spec.tools] or None
    route = spec.route
    for iteration in range(spec.max_iterations):
        request = LLMRequest(
            model=route.upstream_model,
            messages=messages,
            stream=spec.stream,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            tools=definitions,
        )
        # The first call's messages are the initial ones, whose tokens the spec already counted.
        prompt_tokens = spec.prompt_tokens if iteration == 0 else None
        call = ModelCall(route, request, metrics, spec.ticket, prompt_tokens=prompt_tokens)
        told = 0  # fallbacks already reported as events
        try:
            while True:
                try:
                    chunk = await spec.control.within(anext(call))
                except StopAsyncIteration:
                    break
                except AppError:
                    for fallback in _fallback_events(spec, progress, call, told):
                        yield fallback  # the failure that follows is the fallback's: say so first
                    raise
                if len(call.fallbacks) > told:  # rare (a breaker handed the call on): not built per chunk
                    for fallback in _fallback_events(spec, progress, call, told):
                        yield fallback
                    told = len(call.fallbacks)
                if chunk.texts is not None:  # several upstream events read at once: one delta each
                    pieces = chunk.pieces
                    for left, piece in enumerate(pieces, 1 - len(pieces)):
                        spec.burst = -left
                        yield TokenDelta(task_id=spec.id, seq=progress.next_seq(), delta=piece)
                elif chunk.text:
                    yield TokenDelta(task_id=spec.id, seq=progress.next_seq(), delta=chunk.text)
        finally:
            await call.aclose()
        route = call.route  # a fallback that took over keeps the task for its later calls
        response = call.response()
        progress.usage.add(response.usage)
        progress.usage_estimated |= response.usage_estimated
        progress.cost_usd += route.cost(response.usage)

        if not response.tool_calls:
            spec.turn.append({"role": "assistant", "content": response.text})
            yield TaskCompleted(
                task_id=spec.id,
                seq=progress.next_seq(),
                id=spec.id,
                output=response.text,
                tool_calls=progress.tool_calls,
                usage=_usage_out(progress.usage),
                usage_estimated=progress.usage_estimated,
                cost_usd=float(progress.cost_usd),
                model=route.name,
                provider=route.provider.name,
                tier=spec.tier,
                finish_reason=response.finish_reason,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            return

        assistant = _assistant_message(response.text, response.tool_calls)
        messages.append(assistant)
        spec.turn.append(assistant)
        records: list[ToolCallRecord] = []
        async for tool_event in _tool_turn(spec, progress, tools, response.tool_calls, records):
            yield tool_event
        progress.tool_calls.extend(records)
        for record in records:  # in call order, whatever order they finished in
            content = {"error": record.error} if record.error is not None else record.result
            result: Message = {"role": "tool", "tool_call_id": record.call_id, "content": _json(content)}
            messages.append(result)
            spec.turn.append(result)
    raise MaxIterationsExceeded(f"The model was still calling tools after {spec.max_iterations} iterations.")


def _fallback_events(spec: TaskSpec, progress: _Progress, call: ModelCall, told: int) -> list[ModelFallback]:
    return [
        ModelFallback(
            task_id=spec.id, seq=progress.next_seq(), model=note.model, fallback=note.fallback, reason=note.reason
        )
        for note in call.fallbacks[told:]
    ]


async def _tool_turn(
    spec: TaskSpec,
    progress: _Progress,
    tools: ToolInvoker,
    calls: list[ToolCall],
    records: list[ToolCallRecord],
) -> AsyncGenerator[Event, None]:
    """The tool calls of one model turn, run concurrently (at most spec.max_parallel_tools at once).

    Every tool.call event comes first, in call order; each tool.result as its call finishes;
    `records` is filled in call order for the messages back to the model.
    """
    arguments = [_arguments_for_display(call.arguments) for call in calls]
    for call, shown in zip(calls, arguments, strict=True):
        yield ToolCallStarted(
            task_id=spec.id, seq=progress.next_seq(), call_id=call.id, tool=call.name, arguments=shown
        )
    slots = asyncio.Semaphore(spec.max_parallel_tools)
    by_call: dict[int, ToolCallRecord] = {}
    running = {
        asyncio.create_task(_run_tool(spec, tools, slots, call, shown)): index
        for index, (call, shown) in enumerate(zip(calls, arguments, strict=True))
    }
    try:
        while running:
            done, _ = await spec.control.within(asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED))
            for finished in sorted(done, key=running.__getitem__):
                index = running.pop(finished)
                record = by_call[index] = finished.result()  # the task's deadline passing ends the task
                yield ToolCallFinished(
                    task_id=spec.id,
                    seq=progress.next_seq(),
                    call_id=record.call_id,
                    tool=record.tool,
                    result=record.result,
                    error=record.error,
                    duration_ms=record.duration_ms,
                )
    finally:
        for task in running:  # the consumer left, the deadline passed, or a cancel: stop what still runs
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    records.extend(by_call[index] for index in range(len(calls)))


async def _run_tool(
    spec: TaskSpec, tools: ToolInvoker, slots: asyncio.Semaphore, call: ToolCall, shown: Any
) -> ToolCallRecord:
    """One tool call of the loop; every failure becomes an error the model gets to read, never a crash."""
    audit = spec.ticket.audit if spec.ticket is not None else None
    tool = spec.tools_by_name.get(call.name)
    if tool is None:
        available = ", ".join(sorted(spec.tools_by_name)) or "none"
        outcome = tools.not_called(
            call.name, f"unknown tool {call.name!r}; available: {available}", known=False, audit=audit
        )
    else:
        try:
            arguments = tool.parse_arguments(call.arguments)
        except ToolError as exc:
            outcome = tools.not_called(call.name, str(exc), known=True, audit=audit)
        else:
            async with slots:
                outcome = await tools.call(
                    tool, arguments, spec.tool_context, deadline=spec.control.deadline, audit=audit
                )
    error = outcome.error
    if isinstance(outcome.refusal, CircuitOpen):
        error = f"{call.name} is failing and paused for {outcome.refusal.retry_after or 1:.0f} s; do without it for now"
    elif outcome.refusal is not None:  # a refusal of the tool's own (the sandbox is busy, say)
        error = f"{outcome.refusal.code}: {outcome.refusal.detail}"
    return ToolCallRecord(
        call_id=call.id,
        tool=call.name,
        arguments=shown,
        result=outcome.result,
        error=error,
        duration_ms=outcome.duration_ms,
    )


def initial_messages(spec: TaskSpec) -> list[Message]:
    """The conversation a task starts with: system prompt, context facts, the session's history, the query."""
    messages: list[Message] = [{"role": "system", "content": spec.system_prompt}]
    facts = {k: v for k, v in (spec.context or {}).items() if k != "model_tier"}
    if facts:
        messages.append({"role": "system", "content": "Context: " + _json(facts)})
    if spec.history is not None:
        messages += spec.history.messages
    messages.append({"role": "user", "content": spec.query})
    return messages


def _assistant_message(text: str, calls: list[ToolCall]) -> Message:
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ],
    }


def _arguments_for_display(raw: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _usage_out(usage: Usage) -> UsageOut:
    return UsageOut(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _failed(spec: TaskSpec, progress: _Progress, exc: AppError) -> TaskFailed:
    event = TaskFailed(
        task_id=spec.id,
        seq=progress.next_seq(),
        code=exc.code,
        detail=exc.detail,
        retryable=exc.retryable,
        status=exc.status,
    )
    event.error = exc
    return event


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
