"""One call of one tool, the same for the agent loop and for direct invocation: breaker, timeout, metrics, audit."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from app.audit.context import AuditContext
from app.enforcement.breaker import BreakerRegistry, classify
from app.errors import AppError, CircuitOpen
from app.observability import tracing
from app.observability.metrics import Metrics
from app.tools.base import Tool, ToolContext, ToolError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What one call came to. `refusal` is set when the tool was never run (its breaker is open, or it
    has no capacity right now): a direct call answers it as an HTTP error, the agent loop tells the
    model. Otherwise `error` is None on success, or what went wrong, with `result` holding what the
    tool produced anyway (a sandboxed program's output)."""

    result: Any = None
    error: str | None = None
    refusal: AppError | None = None
    duration_ms: float = 0.0


class ToolInvoker:
    def __init__(self, breakers: BreakerRegistry, metrics: Metrics) -> None:
        self._breakers = breakers
        self._metrics = metrics

    async def call(
        self,
        tool: Tool,
        arguments: Any,
        context: ToolContext,
        *,
        deadline: float | None = None,
        audit: AuditContext | None = None,
    ) -> ToolOutcome:
        """Run `tool` with validated `arguments`, within its own timeout and the task's `deadline`.

        Raises only what ends the whole task: TimeoutError when the task's deadline passes first,
        and cancellation. Everything else is an outcome; the breaker counts only failures that say
        something about the tool's backend (see `classify`), never what the caller sent.
        """
        if tracing.TRACER is not None:
            return await tracing.traced_tool(tool.name, self._call(tool, arguments, context, deadline, audit), _failure)
        return await self._call(tool, arguments, context, deadline, audit)

    async def _call(
        self, tool: Tool, arguments: Any, context: ToolContext, deadline: float | None, audit: AuditContext | None
    ) -> ToolOutcome:
        started = time.perf_counter()
        if audit is not None:
            audit.tool_names.append(tool.name)
        breaker = self._breakers.get(f"tool:{tool.name}")
        try:
            breaker.before_call()
        except CircuitOpen as exc:
            return self._done(tool, started, refusal=exc)
        limit = asyncio.get_running_loop().time() + tool.timeout_s
        task_deadline_first = deadline is not None and deadline <= limit
        if deadline is not None and task_deadline_first:
            limit = deadline
        try:
            async with asyncio.timeout_at(limit):
                result = await tool.run(arguments, context)
        except TimeoutError:
            if task_deadline_first:
                breaker.record_ignored()  # the caller's budget ran out, not the tool
                raise
            breaker.record_failure()
            return self._done(tool, started, error=f"{tool.name} timed out after {tool.timeout_s:g} s")
        except ToolError as exc:
            if classify(exc) == "failure":
                breaker.record_failure()
            else:
                breaker.record_ignored()
            return self._done(tool, started, error=str(exc), result=exc.result)
        except AppError as exc:
            breaker.record_ignored()  # a refusal of the tool's own (the sandbox is busy): nothing was run
            return self._done(tool, started, refusal=exc)
        except Exception as exc:
            # A fault of the tool's code: logged once (the request id is on the line) and counted.
            breaker.record_failure()
            log.error("tool %s raised", tool.name, exc_info=exc)
            return self._done(tool, started, error=f"{tool.name} failed: {type(exc).__name__}")
        except BaseException:
            breaker.record_ignored()  # cancelled: the caller left
            raise
        breaker.record_success()
        return self._done(tool, started, result=result)

    def not_called(self, name: str, error: str, *, known: bool, audit: AuditContext | None = None) -> ToolOutcome:
        """A call the model asked for and that could not be made: an unknown tool, or bad arguments."""
        if audit is not None:
            audit.tool_names.append(name)
        # Unknown names come from the model: one label for all of them, so they cannot grow the metric.
        self._metrics.tool_calls.labels(name if known else "unknown", "error").inc()
        return ToolOutcome(error=error)

    def _done(
        self,
        tool: Tool,
        started: float,
        *,
        result: Any = None,
        error: str | None = None,
        refusal: AppError | None = None,
    ) -> ToolOutcome:
        outcome = "refused" if refusal is not None else "error" if error is not None else "ok"
        self._metrics.tool_calls.labels(tool.name, outcome).inc()
        elapsed = time.perf_counter() - started
        if refusal is None:  # a refused call never ran
            self._metrics.tool_seconds.labels(tool.name).observe(elapsed)
        duration_ms = round(elapsed * 1000, 3)
        return ToolOutcome(result=result, error=error, refusal=refusal, duration_ms=duration_ms)


def _failure(outcome: ToolOutcome) -> tuple[str | None, str | None]:
    """A call's outcome as its span's (error code, detail): the refusal's code, the sandbox's status, or tool_error."""
    if outcome.refusal is not None:
        return outcome.refusal.code, outcome.refusal.detail
    if outcome.error is None:
        return None, None
    status = outcome.result.get("status") if isinstance(outcome.result, dict) else None
    return (status if isinstance(status, str) and status != "ok" else "tool_error"), outcome.error[:300]
