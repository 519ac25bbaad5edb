"""The agent loop: model call -> tool calls -> model call ..., as an async generator of TaskEvents.

The runner knows nothing of transports. It never yields from inside a timeout scope (a suspended
generator would carry the scope into its consumer); instead every await is bounded by the task's
deadline on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from app.agent.events import (
    ModelFallback,
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
from app.audit.context import AuditContext
from app.enforcement.breaker import BreakerRegistry, classify
from app.enforcement.enforcer import Ticket
from app.errors import AppError, CircuitOpen, MaxIterationsExceeded, RequestTimeout
from app.observability.metrics import Metrics
from app.providers.base import LLMRequest, Message, ToolCall, Usage
from app.providers.registry import ModelRoute
from app.tools.base import Tool, ToolContext, ToolError

log = logging.getLogger(__name__)

T = TypeVar("T")
Event = TaskStarted | ModelFallback | TokenDelta | ToolCallStarted | ToolCallFinished | TaskCompleted | TaskFailed


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
    audit: AuditContext | None = None


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


async def run_agent(spec: TaskSpec, metrics: Metrics) -> AsyncGenerator[Event, None]:
    progress = _Progress()
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + spec.timeout_s
    yield TaskStarted(
        task_id=spec.id,
        seq=progress.next_seq(),
        model=spec.route.name,
        provider=spec.route.provider.name,
        tier=spec.tier,
    )
    try:
        # aclosing: if our consumer goes away, the inner loop (and its upstream call) closes now.
        async with aclosing(_loop(spec, progress, metrics, deadline, started)) as events:
            async for event in events:
                yield event
    except TimeoutError:
        yield _failed(spec, progress, RequestTimeout(f"The task did not finish within {spec.timeout_s:g} s."))
    except AppError as exc:
        yield _failed(spec, progress, exc)
    except Exception:
        log.exception("task %s failed unexpectedly", spec.id)
        yield _failed(spec, progress, AppError("The task failed on an internal error."))


async def _loop(
    spec: TaskSpec, progress: _Progress, metrics: Metrics, deadline: float, started: float
) -> AsyncGenerator[Event, None]:
    messages = initial_messages(spec)
    tools_by_name = {tool.name: tool for tool in spec.tools}
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
        try:
            while True:
                try:
                    chunk = await _before(deadline, anext(call))
                except StopAsyncIteration:
                    break
                except CircuitOpen as exc:
                    if route.fallback is None:
                        raise
                    # The breaker refused before anything was sent: switch to the fallback for good.
                    yield ModelFallback(
                        task_id=spec.id,
                        seq=progress.next_seq(),
                        model=route.name,
                        fallback=route.fallback.name,
                        reason=exc.code,
                    )
                    await call.aclose()
                    route = route.fallback
                    request.model = route.upstream_model
                    call = ModelCall(route, request, metrics, spec.ticket, prompt_tokens=prompt_tokens)
                    continue
                if chunk.text:
                    yield TokenDelta(task_id=spec.id, seq=progress.next_seq(), delta=chunk.text)
        finally:
            await call.aclose()
        response = call.response()
        progress.usage.add(response.usage)
        progress.usage_estimated |= response.usage_estimated
        progress.cost_usd += route.cost(response.usage)

        if not response.tool_calls:
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

        messages.append(_assistant_message(response.text, response.tool_calls))
        for tool_call in response.tool_calls:
            arguments = _arguments_for_display(tool_call.arguments)
            yield ToolCallStarted(
                task_id=spec.id,
                seq=progress.next_seq(),
                call_id=tool_call.id,
                tool=tool_call.name,
                arguments=arguments,
            )
            breakers = spec.ticket.enforcer.breakers if spec.ticket is not None else None
            if spec.audit is not None:
                spec.audit.tool_names.append(tool_call.name)
            record = await _run_tool(
                tools_by_name, tool_call, arguments, deadline, metrics, breakers, spec.tool_context
            )
            progress.tool_calls.append(record)
            yield ToolCallFinished(
                task_id=spec.id,
                seq=progress.next_seq(),
                call_id=record.call_id,
                tool=record.tool,
                result=record.result,
                error=record.error,
                duration_ms=record.duration_ms,
            )
            content = {"error": record.error} if record.error is not None else record.result
            messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": _json(content)})
    raise MaxIterationsExceeded(f"The model was still calling tools after {spec.max_iterations} iterations.")


async def _run_tool(
    tools: dict[str, Tool],
    call: ToolCall,
    arguments: Any,
    deadline: float,
    metrics: Metrics,
    breakers: BreakerRegistry | None,
    context: ToolContext,
) -> ToolCallRecord:
    """Run one tool call; every failure becomes an error the model gets to read, never a crash."""
    started = time.perf_counter()
    result: Any = None
    error: str | None = None
    tool = tools.get(call.name)
    breaker = breakers.get(f"tool:{call.name}") if breakers is not None and tool is not None else None
    if tool is None:
        error = f"unknown tool {call.name!r}; available: {', '.join(sorted(tools)) or 'none'}"
    else:
        try:
            if breaker is not None:
                breaker.before_call()
            try:
                result = await _before(deadline, tool.run(tool.parse_arguments(call.arguments), context))
            except BaseException as exc:
                # The task's own deadline (a TimeoutError from _before) is the caller's budget running
                # out, not the tool failing: counting it would let one caller pause a tool for all.
                if breaker is not None and classify(exc) == "failure" and not isinstance(exc, TimeoutError):
                    breaker.record_failure()
                elif breaker is not None:
                    breaker.record_ignored()
                raise
            if breaker is not None:
                breaker.record_success()
        except CircuitOpen as exc:
            error = f"{call.name} is failing and paused for {exc.retry_after or 1:.0f} s; do without it for now"
        except ToolError as exc:
            error, result = str(exc), exc.result
        except AppError as exc:  # a refusal of the tool's own (the sandbox is busy, say)
            error = f"{exc.code}: {exc.detail}"
        except TimeoutError:
            raise
        except Exception as exc:
            log.exception("tool %s raised", call.name)
            error = f"{call.name} failed: {type(exc).__name__}"
    metrics.tool_calls.labels(call.name if tool else "unknown", "ok" if error is None else "error").inc()
    return ToolCallRecord(
        call_id=call.id,
        tool=call.name,
        arguments=arguments,
        result=result,
        error=error,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )


async def _before(deadline: float, awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout_at(deadline):
        return await awaitable


def initial_messages(spec: TaskSpec) -> list[Message]:
    """The conversation a task starts with: system prompt, context facts, the query."""
    messages: list[Message] = [{"role": "system", "content": spec.system_prompt}]
    facts = {k: v for k, v in (spec.context or {}).items() if k != "model_tier"}
    if facts:
        messages.append({"role": "system", "content": "Context: " + _json(facts)})
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
