"""Limits that hold across instances (two servers, one real Redis), budgets under concurrency, Redis outages."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    PacemakerServer,
    RedisServer,
    require_service,
    server_config,
    start_pacemaker,
)


def shared_config(workdir: Path, upstream: str, redis_url: str, **limits: Any) -> dict[str, Any]:
    return server_config(
        workdir,
        upstream,
        limits={"redis_url": redis_url, **limits},
        breakers={"min_calls": 1_000_000},
        retries={"max_retries": 0},
    )


@pytest.fixture
def two_instances(tmp_path: Path, fake_upstream: str) -> Iterator[tuple[PacemakerServer, PacemakerServer]]:
    """Two Pacemaker processes on one database and one Redis (a fresh key prefix is not needed:
    limits are keyed by API key id, and each test makes its own keys)."""
    require_service("Redis", "127.0.0.1", 6379)
    config = shared_config(tmp_path, fake_upstream, "redis://127.0.0.1:6379/0")
    first = start_pacemaker(tmp_path / "a", {**config})
    # The second instance shares the first one's database (and so its keys).
    second = start_pacemaker(tmp_path / "b", {**config})
    yield first, second
    first.process.stop()
    second.process.stop()


def create_key(server: PacemakerServer, *args: str) -> str:
    key: str = json.loads(server.cli("keys", "create", "--name", uuid.uuid4().hex[:8], "--json", *args).stdout)["key"]
    return key


async def drive(
    servers: tuple[PacemakerServer, ...],
    key: str,
    *,
    per_second: float,
    seconds: float,
    body: dict[str, Any],
    path: str = "/v1/tasks",
) -> tuple[list[httpx.Response], int, float]:
    """Send requests at a steady rate, alternating servers; return (accepted, refused count, elapsed)."""
    clients = [s.client(key=key) for s in servers]
    accepted: list[httpx.Response] = []
    refused = 0
    started = time.monotonic()
    pending: list[asyncio.Task[httpx.Response]] = []
    try:
        n = 0
        while (now := time.monotonic() - started) < seconds:
            pending.append(asyncio.create_task(clients[n % len(clients)].post(path, json=body)))
            n += 1
            await asyncio.sleep(max(0.0, n / per_second - (time.monotonic() - started)))
        for response in await asyncio.gather(*pending):
            if response.status_code == 200:
                accepted.append(response)
            elif response.status_code == 429:
                refused += 1
            else:
                raise AssertionError(f"unexpected {response.status_code}: {response.text}")
        del now
    finally:
        for client in clients:
            await client.aclose()
    return accepted, refused, time.monotonic() - started


async def test_two_instances_share_one_rpm_limit(two_instances: tuple[PacemakerServer, PacemakerServer]) -> None:
    first, second = two_instances
    key = create_key(first, "--rpm", "60", "--burst", "5")  # 1 request/s after a burst of 5
    responses, refused, elapsed = await drive(
        (first, second), key, per_second=3.0, seconds=10.0, body={"query": "shared"}
    )
    accepted = len(responses)
    assert accepted <= 5 + 1.0 * elapsed + 1, (accepted, elapsed)
    assert accepted >= 1.0 * elapsed - 1, (accepted, elapsed)  # and it still lets the allowed rate through
    assert refused > 0


async def test_two_instances_share_one_tpm_limit_charged_with_real_usage(
    two_instances: tuple[PacemakerServer, PacemakerServer], upstream_stats: httpx.AsyncClient
) -> None:
    first, second = two_instances
    tag = uuid.uuid4().hex[:8]
    # Each request: an estimate of ~ (prompt + 20) tokens at admission, settled to the fake's count.
    key = create_key(first, "--tpm", "1200", "--rpm", "100000")
    body = {"query": f"tokens #tag={tag} #tokens=20", "model": "fake-model", "max_tokens": 20}
    accepted, refused, elapsed = await drive((first, second), key, per_second=6.0, seconds=10.0, body=body)
    stats = (await upstream_stats.get("/_control/stats")).json()
    assert stats["by_tag"][tag] == len(accepted)  # refusals never reached the upstream
    # The tokens really spent, as the upstream counted them, stay within the bucket.
    spent = [r.json()["usage"]["total_tokens"] for r in accepted]
    assert sum(spent) <= 1200 + 1200 / 60 * elapsed + max(spent), (len(accepted), sum(spent), elapsed)
    assert refused > 0


async def test_concurrent_requests_never_overshoot_the_budget(tmp_path: Path, fake_upstream: str) -> None:
    server = start_pacemaker(
        tmp_path, server_config(tmp_path, fake_upstream, breakers={"min_calls": 1_000_000}, retries={"max_retries": 0})
    )
    try:
        # fake-model: 1 USD per million prompt tokens, 2 per million completion tokens. With max_tokens
        # 1000 the reservation is ~0.002 USD a request, the real cost about a tenth of it.
        key = create_key(server, "--budget-usd", "0.0045", "--rpm", "100000")
        body = {
            "model": "fake-model",
            "max_tokens": 1000,
            "messages": [{"role": "user", "content": "spend a little #tokens=100 #latency=0.2"}],
        }
        async with server.client(key=key) as http:
            responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(50)))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 402]
        assert len(ok) + len(refused) == 50
        assert refused and refused[0].json()["error"]["code"] == "budget_exceeded"
        spent = sum(Decimal(r.headers["x-pacemaker-cost-usd"]) for r in ok)
        assert spent <= Decimal("0.0045")
        assert len(ok) >= 2  # the reservation, not the real cost, is what held the others back
    finally:
        server.process.stop()


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_outage_never_hangs_and_limiting_resumes_after_it(
    tmp_path: Path, fake_upstream: str, policy: str
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    config = shared_config(tmp_path, fake_upstream, redis.url, redis_failure_policy=policy, expected_instances=2)
    server = start_pacemaker(tmp_path, config)
    try:
        key = create_key(server, "--rpm", "60", "--burst", "4")
        async with server.client(key=key) as http:

            async def timed(query: str) -> tuple[int, float, str]:
                started = time.monotonic()
                response = await http.post("/v1/tasks", json={"query": query})
                code = response.json().get("code", "") if response.status_code != 200 else ""
                return response.status_code, time.monotonic() - started, code

            before = [await timed("before") for _ in range(6)]
            assert [s for s, _, _ in before] == [200] * 4 + [429] * 2

            redis.kill()
            during = [await timed("during") for _ in range(8)]
            # Never a hang: the Redis timeouts (250 ms) plus the request's own work.
            assert max(duration for _, duration, _ in during) < 1.0, during
            statuses = [status for status, _, _ in during]
            if policy == "fail_open":
                # The local fallback allows limit / expected_instances: a burst of 2, then 429s.
                assert statuses[:2] == [200, 200] and set(statuses[2:]) == {429}, statuses
                assert all(code != "limiter_unavailable" for _, _, code in during)
            else:
                assert set(statuses) == {503}
                assert {code for _, _, code in during} == {"limiter_unavailable"}
            metrics = (await http.get("/metrics")).text
            assert "pacemaker_limiter_backend_errors_total" in metrics

            redis.start()  # an empty Redis: shared limiting starts afresh, without a restart of ours
            await asyncio.sleep(1.2)  # the limiter's cool-down before it tries Redis again
            after = [await timed("after") for _ in range(6)]
            assert [s for s, _, _ in after] == [200] * 4 + [429] * 2, after
    finally:
        server.process.stop()
        redis.kill()


async def test_fail_closed_serves_every_request_once_redis_is_back_despite_dead_pooled_connections(
    tmp_path: Path, fake_upstream: str
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    config = server_config(
        tmp_path,
        fake_upstream,
        limits={"redis_url": redis.url, "redis_failure_policy": "fail_closed"},
        tools={"python": False},
    )
    server = start_pacemaker(tmp_path, config)
    try:
        key = create_key(server, "--rpm", "1000000", "--burst", "100000", "--max-concurrency", "1000")

        async def wave(size: int) -> list[int]:
            # A client per wave: a keep-alive connection idle past the server's timeout is not reused.
            async with server.client(key=key, limits=httpx.Limits(max_connections=32)) as http:
                responses = await asyncio.gather(*(http.post("/v1/tasks", json={"query": "q"}) for _ in range(size)))
            return [response.status_code for response in responses]

        # Concurrent load fills the server's Redis pool with connections that the restart kills (tried
        # again if a busy machine made one of the many connects miss its 250 ms: not what is tested).
        for _ in range(5):
            if set(await wave(32)) == {200}:
                break
            await asyncio.sleep(1.1)
        else:
            raise AssertionError("the warm-up never passed")
        redis.kill()
        assert set(await wave(16)) == {503}
        redis.start()
        deadline = time.monotonic() + 10
        while await wave(1) != [200]:
            assert time.monotonic() < deadline, "the server never used Redis again"
            await asyncio.sleep(0.05)
        after = [status for _ in range(10) for status in await wave(32)]
        assert after.count(503) == 0, f"{after.count(503)} of {len(after)} refused after Redis came back"
        assert set(after) == {200}
    finally:
        server.process.stop()
        redis.kill()
