"""The upstream's circuit breaker on a real server: it opens, refuses with Retry-After, probes, closes; fallback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker

OPEN_S = 1.0


@pytest.fixture(scope="module")
def breaking(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("breaker")
    config = server_config(
        workdir,
        fake_upstream,
        breakers={"min_calls": 4, "failure_rate_threshold": 0.5, "open_s": OPEN_S, "window_s": 30},
        retries={"max_retries": 0},
    )
    # One model (so one breaker) per test, so that no test inherits another's breaker state.
    for name in ("opens", "reopens", "client-errors", "openai"):
        config["models"][f"fake-{name}"] = {"provider": "fake", "upstream_model": f"upstream-{name}"}
    config["models"]["fake-guarded"] = {
        "provider": "fake",
        "upstream_model": "upstream-guarded",
        "fallback": "sim-small",
    }
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


async def test_breaker_opens_at_the_threshold_refuses_then_a_probe_closes_it(breaking: PacemakerServer) -> None:
    tag = uuid.uuid4().hex[:8]
    model = "fake-opens"
    async with breaking.client() as http:
        statuses = [
            (await http.post("/v1/tasks", json={"query": f"#status=500 #tag={tag}", "model": model})).status_code
            for _ in range(4)
        ]
        refused = await http.post("/v1/tasks", json={"query": "would work now", "model": model})
        gauge = (await http.get("/metrics")).text
        await asyncio.sleep(OPEN_S + 0.1)
        probe = await http.post("/v1/tasks", json={"query": "the upstream is back", "model": model})
        closed = await http.post("/v1/tasks", json={"query": "and stays so", "model": model})
        gauge_after = (await http.get("/metrics")).text
    assert statuses == [502, 502, 502, 502]
    assert refused.status_code == 503
    assert refused.json()["code"] == "circuit_open"
    assert 1 <= int(refused.headers["retry-after"]) <= 1 + OPEN_S
    assert 'pacemaker_breaker_state{breaker="model:fake/upstream-opens"} 2.0' in gauge
    assert probe.status_code == 200 and closed.status_code == 200
    assert 'pacemaker_breaker_state{breaker="model:fake/upstream-opens"} 0.0' in gauge_after


async def test_a_failed_probe_reopens_the_breaker(breaking: PacemakerServer) -> None:
    tag = uuid.uuid4().hex[:8]
    async with breaking.client() as http:
        for _ in range(4):
            await http.post("/v1/tasks", json={"query": f"#status=503 #tag={tag}", "model": "fake-reopens"})
        await asyncio.sleep(OPEN_S + 0.1)
        probe = await http.post("/v1/tasks", json={"query": f"#status=500 #tag={tag}", "model": "fake-reopens"})
        refused = await http.post("/v1/tasks", json={"query": "fine", "model": "fake-reopens"})
        await asyncio.sleep(OPEN_S + 0.1)
        recovered = await http.post("/v1/tasks", json={"query": "fine", "model": "fake-reopens"})
    assert probe.status_code == 502
    assert refused.json()["code"] == "circuit_open"
    assert recovered.status_code == 200


async def test_client_errors_do_not_open_the_breaker(breaking: PacemakerServer) -> None:
    async with breaking.client() as http:
        for _ in range(6):
            rejected = await http.post("/v1/tasks", json={"query": "#status=400", "model": "fake-client-errors"})
            assert rejected.status_code == 400
        fine = await http.post("/v1/tasks", json={"query": "fine", "model": "fake-client-errors"})
    assert fine.status_code == 200


async def test_tasks_use_the_fallback_model_while_the_breaker_is_open(breaking: PacemakerServer) -> None:
    async with breaking.client() as http:
        for _ in range(4):
            await http.post("/v1/tasks", json={"query": "#status=500", "model": "fake-guarded"})
        json_result = await http.post("/v1/tasks", json={"query": "carry on", "model": "fake-guarded"})
        body = {"query": "carry on streaming", "model": "fake-guarded", "stream": True}
        async with http.stream("POST", "/v1/tasks", json=body) as response:
            events = [e.json() async for e in read_sse(response)]
    assert json_result.status_code == 200
    assert json_result.json()["model"] == "sim-small"
    assert json_result.json()["provider"] == "simulated"
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["task.started", "model.fallback"]
    assert events[1]["model"] == "fake-guarded" and events[1]["fallback"] == "sim-small"
    assert events[1]["reason"] == "circuit_open"
    assert events[-1]["type"] == "task.completed" and events[-1]["model"] == "sim-small"


async def test_the_openai_route_reports_an_open_breaker_in_its_envelope(breaking: PacemakerServer) -> None:
    tag = uuid.uuid4().hex[:8]
    messages = [{"role": "user", "content": f"#status=500 #tag={tag}"}]
    async with breaking.client() as http:
        for _ in range(4):
            await http.post("/v1/chat/completions", json={"model": "fake-openai", "messages": messages})
        refused = await http.post(
            "/v1/chat/completions", json={"model": "fake-openai", "messages": [{"role": "user", "content": "x"}]}
        )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "circuit_open"
    assert "retry-after" in refused.headers
