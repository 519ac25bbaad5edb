"""What a misbehaving upstream cannot do: lose the tokens it delivered, or spend past what was reserved."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest

from tests.support import PacemakerServer, read_sse


@pytest.fixture(scope="module")
def admin_key(server: PacemakerServer) -> str:
    created = json.loads(server.cli("keys", "create", "--name", "faults-admin", "--admin", "--json").stdout)
    return str(created["key"])


async def audit_row(server: PacemakerServer, admin_key: str, request_id: str) -> dict[str, Any]:
    async with server.client(admin_key) as admin:
        for _ in range(100):  # rows are written in the background, within a flush interval
            rows = (await admin.get("/v1/audit", params={"limit": 500})).json()["data"]
            mine = [row for row in rows if row["request_id"] == request_id]
            if mine:
                assert len(mine) == 1
                return mine[0]
            await asyncio.sleep(0.05)
    raise AssertionError(f"no audit row for {request_id}")


async def test_tokens_sent_just_before_the_upstream_drops_are_delivered_and_counted(
    server: PacemakerServer, admin_key: str, upstream_stats: httpx.AsyncClient
) -> None:
    """The upstream sends two tokens and closes the connection at once, 20 times over.

    Every time, the client gets both tokens and then task.failed, and the audit row counts the
    two completion tokens the upstream served (aiohttp's buffered lines were once lost: the client
    saw them in 8 of 20 tries and the row said 0 tokens).
    """
    for attempt in range(20):
        tag = uuid.uuid4().hex[:10]
        request_id = f"drop-{tag}"
        body = {"query": f"#drop=3 #tag={tag}", "model": "fake-model", "stream": True}
        async with (
            server.client() as http,
            http.stream("POST", "/v1/tasks", json=body, headers={"X-Request-ID": request_id}) as response,
        ):
            events = [event.json() async for event in read_sse(response)]
        deltas = [event["delta"] for event in events if event["type"] == "token.delta"]
        assert deltas == ["alpha", " beta"], (attempt, events)
        assert events[-1]["type"] == "task.failed" and events[-1]["code"] == "upstream_unavailable"
        row = await audit_row(server, admin_key, request_id)
        assert row["completion_tokens"] == 2, (attempt, row)
        assert row["status"] == "failed"


async def test_the_openai_route_delivers_the_tokens_before_a_drop_too(server: PacemakerServer) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "#drop=3"}], "stream": True}
    for attempt in range(10):
        async with server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            events = [event async for event in read_sse(response)]
        contents = [
            json.loads(event.data)["choices"][0]["delta"].get("content")
            for event in events
            if event.data != "[DONE]" and json.loads(event.data).get("choices")
        ]
        assert [text for text in contents if text] == ["alpha", " beta"], (attempt, events)
        assert json.loads(events[-1].data)["error"]["code"] == "upstream_unavailable"


async def test_an_upstream_ignoring_max_tokens_is_stopped_after_one_chunk_too_many(
    server: PacemakerServer, admin_key: str, upstream_stats: httpx.AsyncClient
) -> None:
    """The fake upstream sends 400 tokens whatever max_tokens says: Pacemaker stops reading at 10."""
    tag = uuid.uuid4().hex[:10]
    request_id = f"overrun-{tag}"
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": f"#tokens=400 #delay=0.005 #tag={tag}"}],
        "max_tokens": 10,
        "stream": True,
    }
    async with (
        server.client() as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-ID": request_id}) as response,
    ):
        events = [json.loads(event.data) async for event in read_sse(response) if event.data != "[DONE]"]
    choices = [event["choices"][0] for event in events if event.get("choices")]
    contents = [choice["delta"].get("content") for choice in choices if choice["delta"].get("content")]
    assert 10 <= len(contents) <= 11, contents  # at most one chunk past max_tokens
    assert choices[-1]["finish_reason"] == "length"
    row = await audit_row(server, admin_key, request_id)
    assert row["completion_tokens"] <= 11 and row["status"] == "completed"
    for _ in range(50):  # the upstream sees its connection closed, long before its 400th token
        disconnects = [
            d for d in (await upstream_stats.get("/_control/stats")).json()["disconnects"] if d["tag"] == tag
        ]
        if disconnects:
            break
        await asyncio.sleep(0.05)
    assert disconnects and disconnects[0]["chunks_sent"] < 100, disconnects


async def test_a_budget_cannot_be_overrun_by_an_upstream_ignoring_max_tokens(
    server: PacemakerServer, admin_key: str
) -> None:
    """Non-streamed tasks too (the upstream is streamed under a budget): the spend stays at the budget,
    where it once reached 5.7 times it."""
    budget = "0.0005"
    created = json.loads(
        server.cli(
            "keys", "create", "--name", f"budget-{uuid.uuid4().hex[:6]}", "--budget-usd", budget, "--json"
        ).stdout
    )
    refused = None
    async with server.client(created["key"]) as http:
        for _ in range(60):
            response = await http.post(
                "/v1/tasks", json={"query": "#tokens=2000 #delay=0.001", "model": "fake-model", "max_tokens": 10}
            )
            if response.status_code == 402:
                refused = response
                break
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] <= 11
        assert refused is not None, "the budget never ran out"
        for _ in range(100):  # the usage report reads the audit log, written in the background
            usage = (await http.get("/v1/usage")).json()["totals"]
            if usage["requests"] >= 2:
                break
            await asyncio.sleep(0.05)
    # fake-model: 2 USD per million completion tokens; one chunk past max_tokens costs 2e-6.
    assert float(usage["cost_usd"]) <= float(budget) + 2e-6, usage
