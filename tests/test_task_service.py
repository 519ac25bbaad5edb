"""The task service's own promises: tool calls of one turn run at once, and every way in falls back the same."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker


@pytest.fixture(scope="module")
def serviced(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    """fake-model falls back to sim-small; its breaker opens after two failures of two calls."""
    workdir = tmp_path_factory.mktemp("service")
    slow = fake_upstream.replace("127.0.0.1", "localhost") + "/tools/slow"
    config = server_config(
        workdir,
        fake_upstream,
        breakers={"min_calls": 2, "failure_rate_threshold": 0.5, "open_s": 120},
        retries={"max_retries": 0},
        tools={
            "http": [
                {
                    "name": "slow",
                    "description": "takes a second",
                    "url": slow,
                    "method": "GET",
                    "allow_private": True,
                    "parameters": {"type": "object", "properties": {"call": {"type": "integer"}}},
                }
            ]
        },
    )
    config["models"]["fake-model"]["fallback"] = "sim-small"
    config["models"]["flaky-model"] = {**config["models"]["fake-model"], "fallback": "sim-small"}
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


async def test_the_tool_calls_of_one_turn_run_at_once(serviced: PacemakerServer) -> None:
    """Three 1-second HTTP tool calls in one model turn take about 1 s, not 3: calls in call order,
    each result as it finishes, and the tool messages back to the model in call order."""
    body = {"query": "#tool=slow #calls=3", "model": "fake-model", "tools": ["slow"], "stream": True}
    started = time.monotonic()
    async with serviced.client() as http, http.stream("POST", "/v1/tasks", json=body) as response:
        events = [event.json() async for event in read_sse(response)]
    elapsed = time.monotonic() - started
    kinds = [event["type"] for event in events if event["type"] in ("tool.call", "tool.result")]
    assert kinds == ["tool.call"] * 3 + ["tool.result"] * 3, kinds
    calls = [event for event in events if event["type"] == "tool.call"]
    assert [event["arguments"] for event in calls] == [{"call": 0}, {"call": 1}, {"call": 2}]
    results = [event for event in events if event["type"] == "tool.result"]
    assert all(result["error"] is None and result["duration_ms"] >= 900 for result in results), results
    assert elapsed < 2.5, f"three one-second calls took {elapsed:.1f} s: they did not run at once"
    final = events[-1]
    assert final["type"] == "task.completed"
    assert [call["call_id"] for call in final["tool_calls"]] == ["call_fake_0", "call_fake_1", "call_fake_2"]


async def test_the_openai_route_falls_back_when_the_models_breaker_is_open(serviced: PacemakerServer) -> None:
    """As a task does: a model whose breaker is open is answered by its fallback, not 503 circuit_open."""
    async with serviced.client() as http:
        for _ in range(2):  # two upstream 500s open flaky-model's breaker
            failed = await http.post(
                "/v1/chat/completions",
                json={"model": "flaky-model", "messages": [{"role": "user", "content": "#status=500"}]},
            )
            assert failed.status_code == 502
        plain = {"model": "flaky-model", "messages": [{"role": "user", "content": "hello"}]}
        answered = await http.post("/v1/chat/completions", json=plain)
        assert answered.status_code == 200, answered.text
        assert answered.json()["model"] == "sim-small"
        async with http.stream("POST", "/v1/chat/completions", json={**plain, "stream": True}) as response:
            chunks = [json.loads(event.data) async for event in read_sse(response) if event.data != "[DONE]"]
        assert response.status_code == 200
        assert {chunk["model"] for chunk in chunks} == {"sim-small"}
        task = await http.post("/v1/tasks", json={"query": "hello", "model": "flaky-model", "stream": True})
        assert task.status_code == 200
        assert '"type":"model.fallback"' in task.text


async def test_a_tool_call_from_a_client_and_from_the_loop_share_one_breaker(serviced: PacemakerServer) -> None:
    """Direct calls and the agent loop go through the same call: the same breaker, metrics and audit."""
    async with serviced.client() as http:
        direct = await http.post("/v1/tools/slow/invoke", json={"arguments": {"call": 9}})
        assert direct.status_code == 200 and direct.json()["error"] is None
        metrics = (await http.get("/metrics")).text
    assert 'pacemaker_tool_calls_total{outcome="ok",tool="slow"}' in metrics
