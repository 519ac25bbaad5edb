"""A client that leaves mid-stream cancels the upstream call: the fake upstream sees its connection close."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.support import read_sse

UPSTREAM_CLOSE_DEADLINE_S = 1.0


async def wait_for_disconnect(upstream: httpx.AsyncClient, tag: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [d for d in (await upstream.get("/_control/stats")).json()["disconnects"] if d["tag"] == tag]
        if seen:
            return seen[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"the fake upstream never saw request {tag} disconnect")


async def wait_for_request(upstream: httpx.AsyncClient, tag: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await upstream.get("/_control/stats")).json()["by_tag"].get(tag):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the fake upstream never received request {tag}")


@pytest.mark.parametrize("route", ["tasks", "chat"])
async def test_client_leaving_mid_stream_closes_the_upstream_connection_within_a_second(
    client: httpx.AsyncClient, upstream_stats: httpx.AsyncClient, route: str
) -> None:
    tag = uuid.uuid4().hex[:12]
    query = f"a long answer #tag={tag} #delay=0.05 #tokens=400"
    if route == "tasks":
        request = ("/v1/tasks", {"query": query, "model": "fake-model", "stream": True})
    else:
        request = (
            "/v1/chat/completions",
            {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": query}]},
        )
    received = 0
    async with client.stream("POST", request[0], json=request[1]) as response:
        async for _event in read_sse(response):
            received += 1
            if received == 5:
                break  # leaving the block closes the connection mid-stream
    left_at = time.time()
    seen = await wait_for_disconnect(upstream_stats, tag)
    assert seen["at"] - left_at < UPSTREAM_CLOSE_DEADLINE_S
    assert seen["chunks_sent"] < 400


async def test_client_leaving_while_the_upstream_is_silent_still_cancels_it(
    client: httpx.AsyncClient, upstream_stats: httpx.AsyncClient
) -> None:
    """Disconnect is noticed even when no event is being written (the upstream has not answered yet)."""
    tag = uuid.uuid4().hex[:12]
    body = {"query": f"slow start #tag={tag} #delay=4", "model": "fake-model", "stream": True}
    async with client.stream("POST", "/v1/tasks", json=body) as response:
        async for event in read_sse(response):
            assert event.event == "task.started"
            # task.started comes before the model call: leave once the upstream has the request (and
            # is silent), or there is no upstream connection yet to see closed (a call never made).
            # Inside the loop: leaving it closes the event reader and with it the connection.
            await wait_for_request(upstream_stats, tag)
            break
    left_at = time.time()
    seen = await wait_for_disconnect(upstream_stats, tag)
    assert seen["at"] - left_at < UPSTREAM_CLOSE_DEADLINE_S
    assert seen["chunks_sent"] == 0
