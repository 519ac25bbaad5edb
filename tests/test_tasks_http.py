"""POST /v1/tasks over JSON and SSE: results, events, tiers and the tool loop."""

from __future__ import annotations

import httpx

from tests.support import PacemakerServer, read_sse


async def test_json_task_on_the_simulated_provider_returns_a_complete_result(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/tasks", json={"query": "Explain what an agent core does"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "completed"
    assert result["provider"] == "simulated"
    assert result["model"] == "sim-small" and result["tier"] == "small"
    assert result["output"].startswith("Simulated answer about Explain what an agent core does")
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["cost_usd"] == 0
    assert result["id"].startswith("task_")
    assert response.headers["x-request-id"]


async def test_the_same_query_gets_the_same_simulated_answer(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/tasks", json={"query": "determinism please"})).json()
    second = (await client.post("/v1/tasks", json={"query": "determinism please"})).json()
    assert first["output"] == second["output"]
    assert first["id"] != second["id"]


async def test_mode_picks_the_tier_and_model_tier_or_model_override_it(client: httpx.AsyncClient) -> None:
    cases = [
        ({"mode": "simple"}, "sim-small", "small"),
        ({"mode": "complex"}, "sim-medium", "medium"),
        ({"mode": "research"}, "sim-large", "large"),
        ({"mode": "research", "model_tier": "small"}, "sim-small", "small"),
        ({"mode": "simple", "context": {"model_tier": "large"}}, "sim-large", "large"),
        ({"mode": "research", "model": "sim-medium"}, "sim-medium", None),
    ]
    for fields, model, tier in cases:
        result = (await client.post("/v1/tasks", json={"query": "tiers", **fields})).json()
        assert (result["model"], result["tier"]) == (model, tier), fields


async def test_calculator_loop_on_the_simulated_provider(client: httpx.AsyncClient) -> None:
    result = (await client.post("/v1/tasks", json={"query": "What is 17 * 23 + 4?"})).json()
    assert result["output"] == "The result is 395."
    [call] = result["tool_calls"]
    assert call["tool"] == "calculator"
    assert call["arguments"] == {"expression": "17 * 23 + 4"}
    assert call["result"]["result"] == 395 and call["error"] is None


async def test_calculator_loop_on_the_fake_upstream_streams_call_result_and_answer(
    client: httpx.AsyncClient,
) -> None:
    body = {"query": "Please compute 12 * (3 + 4)", "model": "fake-model", "stream": True}
    async with client.stream("POST", "/v1/tasks", json=body) as response:
        events = [event.json() async for event in read_sse(response)]
    types = [e["type"] for e in events]
    assert types[0] == "task.started" and types[-1] == "task.completed"
    call_at, result_at = types.index("tool.call"), types.index("tool.result")
    assert call_at < result_at < types.index("token.delta")
    assert events[call_at]["arguments"] == {"expression": "12 * (3 + 4)"}
    assert events[result_at]["result"]["result"] == 84
    final = events[-1]
    assert final["output"] == "The answer is 84."
    assert final["provider"] == "fake" and final["usage"]["total_tokens"] > 0
    # Two model calls, priced at 1 USD/Mtok in and 2 USD/Mtok out.
    usage = final["usage"]
    assert final["cost_usd"] == (usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / 1_000_000


async def test_sse_deltas_concatenate_to_the_final_output(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/tasks", json={"query": "stream me", "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [event async for event in read_sse(response)]
    payloads = [e.json() for e in events]
    assert [int(e.id or 0) for e in events] == list(range(1, len(events) + 1))
    assert [p["seq"] for p in payloads] == list(range(1, len(events) + 1))
    assert all(e.event == p["type"] for e, p in zip(events, payloads, strict=True))
    deltas = [p["delta"] for p in payloads if p["type"] == "token.delta"]
    final = payloads[-1]
    assert final["type"] == "task.completed"
    assert "".join(deltas) == final["output"]
    assert final["usage"]["completion_tokens"] == len(deltas)
    assert len({p["task_id"] for p in payloads}) == 1


async def test_accept_header_alone_selects_sse(client: httpx.AsyncClient) -> None:
    headers = {"Accept": "text/event-stream"}
    async with client.stream("POST", "/v1/tasks", json={"query": "hi"}, headers=headers) as response:
        kinds = [event.event async for event in read_sse(response)]
    assert kinds[0] == "task.started" and kinds[-1] == "task.completed"


async def test_max_tokens_truncates_and_reports_length(client: httpx.AsyncClient) -> None:
    result = (await client.post("/v1/tasks", json={"query": "a long answer", "max_tokens": 3})).json()
    assert result["usage"]["completion_tokens"] == 3
    assert result["finish_reason"] == "length"


async def test_task_without_tools_gets_no_calculator(client: httpx.AsyncClient) -> None:
    result = (await client.post("/v1/tasks", json={"query": "What is 2 + 2?", "tools": []})).json()
    assert result["tool_calls"] == []
    assert result["output"].startswith("Simulated answer")


async def test_upstream_failure_in_a_json_task_is_a_problem_with_its_status(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/tasks", json={"query": "boom #status=500", "model": "fake-model"})
    assert response.status_code == 502
    problem = response.json()
    assert problem["code"] == "upstream_error" and problem["retryable"] is True
    assert response.headers["content-type"] == "application/problem+json"


async def test_upstream_failure_in_a_stream_is_an_in_band_task_failed(client: httpx.AsyncClient) -> None:
    body = {"query": "boom #status=503", "model": "fake-model", "stream": True}
    async with client.stream("POST", "/v1/tasks", json=body) as response:
        events = [event.json() async for event in read_sse(response)]
    assert [e["type"] for e in events] == ["task.started", "task.failed"]
    assert events[-1]["code"] == "upstream_error" and events[-1]["status"] == 502


async def test_task_timeout_fails_with_request_timeout(client: httpx.AsyncClient) -> None:
    body = {"query": "slow #latency=3", "model": "fake-model", "timeout_s": 1}
    response = await client.post("/v1/tasks", json=body)
    assert response.status_code == 504
    assert response.json()["code"] == "request_timeout"


async def test_request_id_is_echoed_when_well_formed_and_replaced_otherwise(server: PacemakerServer) -> None:
    async with server.client() as http:
        good = await http.get("/health", headers={"X-Request-ID": "client-req-42"})
        bad = await http.get("/health", headers={"X-Request-ID": "has spaces; and-" * 30})
        problem = await http.post("/v1/tasks", json={}, headers={"X-Request-ID": "trace-me"})
    assert good.headers["x-request-id"] == "client-req-42"
    assert len(bad.headers["x-request-id"]) == 32 and " " not in bad.headers["x-request-id"]
    assert problem.json()["request_id"] == "trace-me"
