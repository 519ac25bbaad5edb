"""The agent loop against a scripted in-process model: tool errors go back to the model, limits hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from decimal import Decimal
from typing import Any

from app.agent.events import TaskCompleted, TaskFailed, ToolCallFinished
from app.agent.runner import TaskSpec, run_agent
from app.auth.principal import Principal
from app.config import LimitSettings
from app.enforcement.breaker import BreakerConfig, BreakerRegistry, BreakerState
from app.enforcement.concurrency import ConcurrencyLimiter
from app.enforcement.enforcer import Enforcer
from app.enforcement.memory_limiter import MemoryLimiter
from app.enforcement.retry import RetryPolicy
from app.observability.metrics import Metrics
from app.providers.base import LLMChunk, LLMRequest, ToolCallDelta, Usage
from app.providers.registry import ModelRoute
from app.tools.calculator import CalculatorTool
from app.tools.invoke import ToolInvoker


class ScriptedModel:
    """Answers each call with the next scripted turn: a tool call (name, arguments) or text."""

    name = "scripted"

    def __init__(self, turns: list[tuple[str, str] | str]) -> None:
        self.turns = turns
        self.requests: list[LLMRequest] = []

    async def generate(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        self.requests.append(request)
        turn = self.turns[min(len(self.requests), len(self.turns)) - 1]
        if isinstance(turn, tuple):
            call = ToolCallDelta(0, f"call_{len(self.requests)}", turn[0], turn[1])
            yield LLMChunk(tool_calls=[call], finish_reason="tool_calls", usage=Usage(10, 5))
        else:
            yield LLMChunk(text=turn, finish_reason="stop", usage=Usage(10, 3))

    async def aclose(self) -> None:
        pass


def spec(model: ScriptedModel, **changes: Any) -> TaskSpec:
    route = ModelRoute("scripted-model", model, "scripted-model", Decimal(2), Decimal(4))
    fields: dict[str, Any] = {
        "id": "task_test",
        "query": "q",
        "route": route,
        "tier": None,
        "tools": [CalculatorTool()],
        "system_prompt": "sys",
        "max_tokens": 100,
        "max_iterations": 8,
        "timeout_s": 10,
        "stream": True,
    }
    fields.update(changes)
    return TaskSpec(**fields)


async def run(task: TaskSpec) -> list[Any]:
    metrics = Metrics()
    breakers = task.ticket.enforcer.breakers if task.ticket is not None else BreakerRegistry(BreakerConfig())
    return [event async for event in run_agent(task, metrics, ToolInvoker(breakers, metrics))]


async def test_unknown_tools_and_bad_arguments_go_back_to_the_model_as_errors() -> None:
    model = ScriptedModel([("teleport", "{}"), ("calculator", '{"expr": 1}'), ("calculator", "{oops"), "done"])
    events = await run(spec(model))
    results = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [r.error is not None for r in results] == [True, True, True]
    assert "unknown tool 'teleport'" in (results[0].error or "")
    assert "invalid arguments for calculator" in (results[1].error or "")
    final = events[-1]
    assert isinstance(final, TaskCompleted) and final.output == "done"
    # The model saw each error as a tool message.
    tool_messages = [m for m in model.requests[-1].messages if m["role"] == "tool"]
    assert len(tool_messages) == 3 and all('"error"' in m["content"] for m in tool_messages)


async def test_usage_is_summed_over_every_model_call_and_priced() -> None:
    model = ScriptedModel([("calculator", '{"expression": "1+1"}'), "two"])
    final = (await run(spec(model)))[-1]
    assert isinstance(final, TaskCompleted)
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (20, 8)
    assert final.cost_usd == float((Decimal(20) * 2 + Decimal(8) * 4) / 1_000_000)
    assert [e.seq for e in await run(spec(ScriptedModel(["x"])))] == [1, 2, 3]


async def test_a_model_that_never_stops_calling_tools_hits_max_iterations() -> None:
    model = ScriptedModel([("calculator", '{"expression": "1"}')])
    final = (await run(spec(model, max_iterations=3)))[-1]
    assert isinstance(final, TaskFailed)
    assert final.code == "max_iterations_exceeded" and not final.retryable
    assert len(model.requests) == 3


async def test_only_the_tools_of_the_task_are_offered() -> None:
    model = ScriptedModel(["fine"])
    await run(spec(model, tools=[]))
    assert model.requests[0].tools is None
    await run(spec(model))
    assert [t["function"]["name"] for t in model.requests[-1].tools or []] == ["calculator"]


class FlakyTool(CalculatorTool):
    """A calculator that crashes: its breaker should open and spare the model further crashes."""

    calls = 0

    async def run(self, arguments: Any, context: Any) -> dict[str, Any]:
        FlakyTool.calls += 1
        raise RuntimeError("tool backend down")


async def test_a_failing_tool_opens_its_breaker_and_the_model_hears_it_is_paused() -> None:
    enforcer = Enforcer(
        LimitSettings(),
        MemoryLimiter(),
        ConcurrencyLimiter(10),
        BreakerRegistry(BreakerConfig(min_calls=2, failure_rate_threshold=0.5, open_s=60)),
        RetryPolicy(),
        Metrics(),
    )
    model = ScriptedModel([("calculator", '{"expression": "1"}')] * 4 + ["gave up"])
    route = ModelRoute("scripted-model", model, "scripted-model", Decimal(0), Decimal(0))
    ticket = await enforcer.admit(Principal(1, "t", "pk_t"), route=route, prompt_tokens=10, max_tokens=100)
    events = await run(spec(model, tools=[FlakyTool()], ticket=ticket))
    errors = [e.error for e in events if isinstance(e, ToolCallFinished)]
    assert FlakyTool.calls == 2  # the third and fourth calls never reached the tool
    assert errors[0] == errors[1] == "calculator failed: RuntimeError"
    assert all("paused" in (error or "") for error in errors[2:])
    assert enforcer.breakers.states()["tool:calculator"] == BreakerState.OPEN
    await ticket.close()


class SlowTool(CalculatorTool):
    """A healthy tool that takes longer than the tasks that call it allow."""

    async def run(self, arguments: Any, context: Any) -> dict[str, Any]:
        await asyncio.sleep(1)
        return {"result": 1}


async def test_a_task_running_out_of_time_in_a_tool_does_not_count_against_the_tool() -> None:
    enforcer = Enforcer(
        LimitSettings(),
        MemoryLimiter(),
        ConcurrencyLimiter(10),
        BreakerRegistry(BreakerConfig(min_calls=2, failure_rate_threshold=0.5, open_s=60)),
        RetryPolicy(),
        Metrics(),
    )
    for _ in range(4):
        model = ScriptedModel([("calculator", '{"expression": "1"}'), "done"])
        route = ModelRoute("scripted-model", model, "scripted-model", Decimal(0), Decimal(0))
        ticket = await enforcer.admit(Principal(1, "t", "pk_t"), route=route, prompt_tokens=10, max_tokens=100)
        events = await run(spec(model, tools=[SlowTool()], ticket=ticket, timeout_s=0.05))
        await ticket.close()
        assert isinstance(events[-1], TaskFailed) and events[-1].code == "request_timeout"
    # One caller's short deadlines must not pause the tool for everyone else.
    assert enforcer.breakers.states()["tool:calculator"] == BreakerState.CLOSED
