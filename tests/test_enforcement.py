"""Enforcement end to end on a real server: limits per transport, ceilings, concurrency, retries, idempotency."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from starlette.types import Receive, Scope, Send

from app.middleware import RequestContextMiddleware, TrafficCounters, add_response_headers
from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    """In-process limits; quick retries; a breaker that stays closed (breakers have their own tests)."""
    workdir = tmp_path_factory.mktemp("enforced")
    config = server_config(
        workdir,
        fake_upstream,
        breakers={"min_calls": 1_000_000},
        retries={"max_retries": 2, "base_delay_s": 0.01, "max_delay_s": 0.05},
    )
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


def new_key(server: PacemakerServer, **limits: Any) -> str:
    args = ["keys", "create", "--name", f"k-{uuid.uuid4().hex[:6]}", "--json"]
    for name, value in limits.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    key: str = json.loads(server.cli(*args).stdout)["key"]
    return key


async def upstream_count(upstream: httpx.AsyncClient, tag: str) -> int:
    count: int = (await upstream.get("/_control/stats")).json()["by_tag"].get(tag, 0)
    return count


async def test_rate_limited_json_requests_get_429_with_a_computed_retry_after(enforced: PacemakerServer) -> None:
    key = new_key(enforced, rpm=6, burst=2)  # one request every 10 s after a burst of 2
    async with enforced.client(key=key) as http:
        first = await http.post("/v1/tasks", json={"query": "one"})
        second = await http.post("/v1/tasks", json={"query": "two"})
        third = await http.post("/v1/tasks", json={"query": "three"})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-remaining-tokens" in first.headers
    assert third.status_code == 429
    problem = third.json()
    assert problem["code"] == "rate_limit_exceeded" and problem["retryable"] is True
    # The bucket refills one request per 10 s: the wait is derived from it, not a constant.
    assert 8 <= int(third.headers["retry-after"]) <= 10
    assert third.headers["x-ratelimit-limit"] == "2"
    assert third.headers["x-ratelimit-remaining"] == "0"
    assert_each_rate_limit_header_once(third)


async def test_a_refused_chat_completion_carries_each_rate_limit_header_once(enforced: PacemakerServer) -> None:
    key = new_key(enforced, rpm=6, burst=1)
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}
    async with enforced.client(key=key) as http:
        first = await http.post("/v1/chat/completions", json=body)
        refused = await http.post("/v1/chat/completions", json=body)
    assert first.status_code == 200 and refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"  # OpenAI's error shape on this route
    assert_each_rate_limit_header_once(refused)


async def test_a_later_refusal_s_headers_replace_those_of_the_admission() -> None:
    # A task's second model call refused on tokens: the admission put its x-ratelimit-* on the
    # request's scope, the refusal carries the same names with fresher values. Each goes out once,
    # the refusal's (they were joined, "600, 400"); what the response does not set still goes out.
    async def refusing_app(scope: Scope, receive: Receive, send: Send) -> None:
        add_response_headers(scope, {"x-ratelimit-remaining-tokens": "600", "x-ratelimit-limit-requests": "60"})
        headers = [(b"content-type", b"application/problem+json"), (b"x-ratelimit-remaining-tokens", b"400")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    app = RequestContextMiddleware(refusing_app, TrafficCounters())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post("/v1/tasks")
    assert response.status_code == 429
    assert response.headers.get_list("x-ratelimit-remaining-tokens") == ["400"]
    assert response.headers.get_list("x-ratelimit-limit-requests") == ["60"]
    assert len(response.headers.get_list("x-request-id")) == 1


def assert_each_rate_limit_header_once(response: httpx.Response) -> None:
    # They were sent twice on a 429 (from the admission and again from the refusal): a client joining
    # repeated headers read "0, 0".
    names = {name for name in response.headers if name.startswith("x-ratelimit-") or name == "retry-after"}
    assert {"x-ratelimit-remaining-requests", "x-ratelimit-limit", "retry-after"} <= names
    for name in names:
        assert len(response.headers.get_list(name)) == 1, (name, response.headers.get_list(name))


async def test_sse_chat_and_websocket_are_limited_like_json(enforced: PacemakerServer) -> None:
    key = new_key(enforced, rpm=6, burst=1)
    async with enforced.client(key=key) as http:
        async with http.stream("POST", "/v1/tasks", json={"query": "s", "stream": True}) as ok:
            assert ok.status_code == 200
            assert [e.event async for e in read_sse(ok)][-1] == "task.completed"
        sse = await http.post("/v1/tasks", json={"query": "s", "stream": True})
        chat = await http.post(
            "/v1/chat/completions", json={"model": "sim-small", "messages": [{"role": "user", "content": "c"}]}
        )
    assert sse.status_code == 429 and sse.json()["code"] == "rate_limit_exceeded"
    assert chat.status_code == 429 and chat.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in chat.headers

    url = enforced.base_url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as socket:
        await socket.send(json.dumps({"type": "task.create", "query": "w", "ref": "r1"}))
        refused = json.loads(await socket.recv())
    assert refused["type"] == "error" and refused["code"] == "rate_limit_exceeded"
    assert refused["ref"] == "r1" and refused["retry_after"] > 0


async def test_token_ceiling_refuses_before_any_upstream_call(
    enforced: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    key = new_key(enforced, max_tokens_per_request=200)
    tag = uuid.uuid4().hex[:10]
    async with enforced.client(key=key) as http:
        too_big = await http.post(
            "/v1/tasks", json={"query": f"x #tag={tag}", "model": "fake-model", "max_tokens": 500}
        )
        fits = await http.post("/v1/tasks", json={"query": f"x #tag={tag}", "model": "fake-model", "max_tokens": 50})
    assert too_big.status_code == 400 and too_big.json()["code"] == "token_limit_exceeded"
    assert fits.status_code == 200
    assert await upstream_count(upstream_stats, tag) == 1


async def test_a_stream_holds_its_concurrency_slot_until_it_ends(enforced: PacemakerServer) -> None:
    key = new_key(enforced, max_concurrency=1)
    async with enforced.client(key=key) as http:
        body = {"query": "hold #delay=0.05 #tokens=20", "model": "fake-model", "stream": True}
        async with http.stream("POST", "/v1/tasks", json=body) as holding:
            events = read_sse(holding)
            assert (await anext(events)).event == "task.started"
            refused = await http.post("/v1/tasks", json={"query": "meanwhile"})
            async for _event in events:
                pass
        after = await http.post("/v1/tasks", json={"query": "after"})
    assert refused.status_code == 429
    assert refused.json()["code"] == "concurrency_limit_exceeded"
    assert "retry-after" in refused.headers
    assert after.status_code == 200


async def test_upstream_failing_twice_then_succeeding_is_one_success_after_two_retries(
    enforced: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:10]
    async with enforced.client() as http:
        before = _metric(await http.get("/metrics"), 'pacemaker_llm_retries_total{model="fake-model"}')
        response = await http.post("/v1/tasks", json={"query": f"flaky #fail=2 #tag={tag}", "model": "fake-model"})
        after = _metric(await http.get("/metrics"), 'pacemaker_llm_retries_total{model="fake-model"}')
    assert response.status_code == 200, response.text
    assert await upstream_count(upstream_stats, tag) == 3
    assert after - before == 2


async def test_a_stream_that_fails_after_its_first_token_is_not_retried(
    enforced: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:10]
    async with enforced.client() as http:
        body = {"query": f"drop #drop=3 #tag={tag}", "model": "fake-model", "stream": True}
        async with http.stream("POST", "/v1/tasks", json=body) as response:
            events = [e.json() async for e in read_sse(response)]
    assert events[-1]["type"] == "task.failed"
    assert events[-1]["code"] == "upstream_unavailable"
    assert any(e["type"] == "token.delta" for e in events)
    assert await upstream_count(upstream_stats, tag) == 1


async def test_idempotency_key_replays_the_stored_result_and_is_never_charged_twice(
    enforced: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:10]
    body = {"query": f"once #tag={tag} #latency=0.3", "model": "fake-model"}
    headers = {"Idempotency-Key": f"order-{tag}"}
    async with enforced.client() as http:
        # The repeat arrives while the first still runs: it waits for it.
        first, repeat = await asyncio.gather(
            http.post("/v1/tasks", json=body, headers=headers),
            _after(0.1, http.post("/v1/tasks", json=body, headers=headers)),
        )
        later = await http.post("/v1/tasks", json=body, headers=headers)
        conflict = await http.post("/v1/tasks", json={**body, "query": "changed"}, headers=headers)
        chat_body = {"model": "fake-model", "messages": [{"role": "user", "content": f"c #tag={tag}"}]}
        chat_once = await http.post("/v1/chat/completions", json=chat_body, headers={"Idempotency-Key": tag})
        chat_again = await http.post("/v1/chat/completions", json=chat_body, headers={"Idempotency-Key": tag})
        streamed = await http.post("/v1/tasks", json={**body, "stream": True}, headers=headers)
    assert first.status_code == repeat.status_code == later.status_code == 200
    assert first.json() == repeat.json() == later.json()
    assert later.headers["idempotent-replayed"] == "true"
    assert conflict.status_code == 422 and conflict.json()["code"] == "idempotency_conflict"
    assert chat_once.json() == chat_again.json()
    assert streamed.status_code == 422
    assert await upstream_count(upstream_stats, tag) == 2  # one task, one chat completion


async def _after(delay: float, request: Any) -> httpx.Response:
    await asyncio.sleep(delay)
    response: httpx.Response = await request
    return response


def _metric(response: httpx.Response, sample: str) -> float:
    for line in response.text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_direct_tool_calls_are_limited_like_json(enforced: PacemakerServer) -> None:
    key = new_key(enforced, rpm=6, burst=2)
    async with enforced.client(key=key) as http:
        listed = (await http.get("/v1/tools")).json()
        calls = [
            await http.post("/v1/tools/calculator/invoke", json={"arguments": {"expression": "6 * 7"}})
            for _ in range(3)
        ]
    assert [tool["name"] for tool in listed] == ["calculator", "python"]
    assert listed[0]["parameters"]["required"] == ["expression"]
    assert [c.status_code for c in calls] == [200, 200, 429]
    assert calls[0].json()["result"]["result"] == 42 and calls[0].json()["error"] is None
    assert calls[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert calls[2].json()["code"] == "rate_limit_exceeded" and "retry-after" in calls[2].headers


async def test_direct_tool_call_errors(enforced: PacemakerServer) -> None:
    async with enforced.client() as http:
        unknown = await http.post("/v1/tools/teleport/invoke", json={"arguments": {}})
        invalid = await http.post("/v1/tools/calculator/invoke", json={"arguments": {"expr": "1"}})
        failing = await http.post("/v1/tools/calculator/invoke", json={"arguments": {"expression": "1 / 0"}})
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    assert invalid.status_code == 422 and "invalid arguments for calculator" in invalid.json()["detail"]
    assert failing.status_code == 200 and failing.json()["error"] == "division by zero"


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("impatient")
    config = server_config(workdir, fake_upstream, agent={"default_timeout_s": 1}, retries={"max_retries": 0})
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


async def test_every_route_has_a_wall_clock_timeout(impatient: PacemakerServer) -> None:
    slow = [{"role": "user", "content": "#latency=3"}]
    trickle = [{"role": "user", "content": "#delay=0.3 #tokens=20"}]
    async with impatient.client() as http:
        task = await http.post("/v1/tasks", json={"query": "#latency=3", "model": "fake-model"})
        chat = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": slow})
        body = {"model": "fake-model", "messages": trickle, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            events = [e async for e in read_sse(response)]
    assert task.status_code == 504 and task.json()["code"] == "request_timeout"
    assert chat.status_code == 504 and chat.json()["error"]["code"] == "request_timeout"
    assert events[-1].json()["error"]["code"] == "request_timeout"  # in-band: the stream had started


async def test_a_retryable_refusal_is_not_kept_under_an_idempotency_key(enforced: PacemakerServer) -> None:
    key = new_key(enforced, rpm=6, burst=1)
    headers = {"Idempotency-Key": f"retry-{uuid.uuid4().hex[:8]}"}
    async with enforced.client(key=key) as http:
        await http.post("/v1/tasks", json={"query": "spend the burst"})
        refused = await http.post("/v1/tasks", json={"query": "later"}, headers=headers)
        again = await http.post("/v1/tasks", json={"query": "later"}, headers=headers)
    assert refused.status_code == again.status_code == 429
    assert "idempotent-replayed" not in again.headers  # a fresh refusal, with its own Retry-After
    assert "retry-after" in again.headers
