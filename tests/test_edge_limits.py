"""Edge limits (app/edge/) on real server processes: per client address, before any key lookup.

The key lookups are counted by PostgreSQL itself (pg_stat_user_tables: every scan of the api_key
table), read after the server has stopped, when every one of its connections has flushed its
statistics: the server cannot make that figure up. A second address is 127.0.0.2 (Linux routes
all of 127/8 to the loopback interface), or an address named by a trusted proxy's X-Forwarded-For.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from tests.support import (
    PacemakerServer,
    RedisServer,
    fresh_postgres_database,
    require_service,
    server_config,
    start_pacemaker,
)

pytestmark = pytest.mark.timeout(180)

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def edge_server(tmp_path: Path, name: str, edge: dict[str, Any], **overrides: Any) -> PacemakerServer:
    workdir = tmp_path / name
    server_settings = {"edge": edge, **overrides.pop("server", {})}
    return start_pacemaker(workdir, server_config(workdir, None, server=server_settings, **overrides))


@asynccontextmanager
async def client_from(server: PacemakerServer, address: str, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client whose connections come from `address` (any of 127/8)."""
    transport = httpx.AsyncHTTPTransport(local_address=address, limits=kwargs.pop("limits", httpx.Limits()))
    async with httpx.AsyncClient(base_url=server.base_url, transport=transport, timeout=30, **kwargs) as http:
        yield http


def bad_key() -> dict[str, str]:
    return {"Authorization": f"Bearer pk_{secrets.token_urlsafe(32)}"}  # a new key each time: never cached


def good(server: PacemakerServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.key}"}


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_edge_refusal(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "edge_rate_limited"
    assert response.json()["retryable"] is True
    assert int(response.headers["retry-after"]) >= 1


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def api_key_scans(dsn: str) -> int:
    """Every scan of the api_key table PostgreSQL has counted in this database: one per key lookup."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("SELECT pg_stat_clear_snapshot()")
        scans = await connection.fetchval(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'api_key'"
        )
        return int(scans)
    finally:
        await connection.close()


async def test_a_flood_of_bad_keys_is_refused_at_the_edge_and_costs_no_key_lookup(tmp_path: Path) -> None:
    with fresh_postgres_database("pacemaker_edge") as url:
        dsn = plain_dsn(url)
        server = edge_server(
            tmp_path, "flood", {"rate": "100000/minute", "failed_auth": "20/minute"}, database={"url": url}
        )
        try:
            # Only what migrate and `keys create` did (their processes have exited, their counts are in).
            before = await api_key_scans(dsn)
            async with client_from(server, "127.0.0.1", limits=httpx.Limits(max_connections=20)) as flood:
                gate = asyncio.Semaphore(20)  # 20 in flight at once: a burst that arrives before any fails

                async def one() -> httpx.Response:
                    async with gate:
                        return await flood.post("/v1/tasks", json={"query": "x"}, headers=bad_key())

                responses = await asyncio.gather(*(one() for _ in range(1000)))
                statuses = Counter(response.status_code for response in responses)
                # Exactly the limit is looked up and fails; every other one is refused before its lookup.
                assert statuses == {401: 20, 429: 980}, statuses
                for response in responses:
                    if response.status_code == 429:
                        assert_edge_refusal(response)

                # The good key is not known yet: from the blocked address it would cost a lookup, so it waits.
                assert_edge_refusal(await flood.post("/v1/tasks", json={"query": "1 + 1"}, headers=good(server)))
                async with client_from(server, "127.0.0.2") as other:
                    served = await other.post("/v1/tasks", json={"query": "2 + 2"}, headers=good(server))
                    assert served.status_code == 200, served.text
                # Known now (cached): served from the blocked address too, at no lookup's cost (the NAT rule).
                known = await flood.post("/v1/tasks", json={"query": "3 + 3"}, headers=good(server))
                assert known.status_code == 200, known.text
                assert_edge_refusal(await flood.post("/v1/tasks", json={"query": "x"}, headers=bad_key()))
                metrics = (await flood.get("/metrics")).text
            assert metric(metrics, "pacemaker_edge_refusals_total") == 982
            assert metric(metrics, "pacemaker_edge_known_key_admissions_total") == 1
        finally:
            server.process.stop()
        # Stopped: every connection has ended and flushed its counts. 20 bad keys and one good one.
        assert await api_key_scans(dsn) - before == 21

        connection = await asyncpg.connect(dsn)
        try:
            rows = Counter(
                (row["http_status"], row["error_code"])
                for row in await connection.fetch("SELECT http_status, error_code FROM audit_record")
            )
            client_ips = {row["client_ip"] for row in await connection.fetch("SELECT client_ip FROM audit_record")}
        finally:
            await connection.close()
        assert rows[(401, "invalid_api_key")] == 20
        assert rows[(200, None)] == 2
        # Refusals are audited cheaply: not one row each (982 refusals), but the first of the block, and the
        # few refused at the lookup itself while the burst's first 20 were in flight.
        refused_rows = rows[(429, "edge_rate_limited")]
        assert 1 <= refused_rows <= 21, rows
        assert client_ips == {"127.0.0.1", "127.0.0.2"}


async def test_the_request_rate_per_address_spares_health_docs_and_known_keys_and_counts_websockets(
    tmp_path: Path,
) -> None:
    server = edge_server(tmp_path, "rate", {"rate": "30/minute", "failed_auth": "10000/minute"})
    try:
        async with client_from(server, "127.0.0.1") as http:
            # The key becomes known with its first request, within the rate.
            assert (await http.get("/v1/tools", headers=good(server))).status_code == 200
            statuses = []
            for n in range(40):
                # X-Forwarded-For is no one's word here: server.proxy_headers is off.
                spoofed = {"X-Forwarded-For": f"198.51.100.{n}"}
                statuses.append((await http.get("/v1/tools", headers=spoofed)).status_code)
            assert statuses == [401] * 29 + [429] * 11, statuses
            refused = await http.get("/v1/tools", headers={"X-Forwarded-For": "198.51.100.200"})
            assert_edge_refusal(refused)
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            assert (await http.get("/v1/nothing-here")).status_code == 429  # every route counts, not only known ones

            # Never limited: probes, metrics, docs and the dashboard's page and files.
            for path in (
                "/health",
                "/health/live",
                "/health/ready",
                "/metrics",
                "/docs",
                "/openapi.json",
                "/dashboard",
                "/dashboard/assets/dashboard.js",
                "/docs/assets/swagger-ui.css",
            ):
                assert (await http.get(path)).status_code == 200, path
            # A known key is served from the address over its rate (its own limits apply).
            assert (await http.get("/v1/tools", headers=good(server))).status_code == 200

            metrics = (await http.get("/metrics")).text
            assert metric(metrics, 'pacemaker_edge_refusals_total{reason="rate"}') == 13

        # A WebSocket handshake is a request like any other: refused with the app's denial (429 problem+json).
        ws_url = server.base_url.replace("http://", "ws://") + "/v1/ws"
        with pytest.raises(websockets.InvalidStatus) as denied:
            async with websockets.connect(ws_url, additional_headers=bad_key()):
                pass
        assert denied.value.response.status_code == 429
        assert b'"edge_rate_limited"' in denied.value.response.body
        assert any(name.lower() == "retry-after" for name, _ in denied.value.response.headers.raw_items())
        # ... and one with a known key opens (the subprotocol pair, as browsers send it).
        async with websockets.connect(ws_url, subprotocols=["pacemaker.bearer", server.key]) as socket:
            assert socket.subprotocol == "pacemaker.bearer"
        # Another address is not affected.
        async with client_from(server, "127.0.0.2") as other:
            assert (await other.get("/v1/tools")).status_code == 401
    finally:
        server.process.stop()
    assert "returned without completing handshake" not in server.process.output()


async def test_behind_a_trusted_proxy_the_forwarded_address_is_limited_and_untrusted_peers_cannot_spoof_it(
    tmp_path: Path,
) -> None:
    server = edge_server(
        tmp_path,
        "proxy",
        {"rate": "5/minute", "failed_auth": "10000/minute"},
        server={"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
    )
    try:
        async with client_from(server, "127.0.0.1") as proxy:
            # The proxy (127.0.0.1, trusted) speaks for two clients: each has its own count.
            first = [
                (await proxy.get("/v1/tools", headers={"X-Forwarded-For": "203.0.113.7"})).status_code for _ in range(7)
            ]
            assert first == [401] * 5 + [429] * 2
            assert (await proxy.get("/v1/tools", headers={"X-Forwarded-For": "203.0.113.8"})).status_code == 401
        async with client_from(server, "127.0.0.2") as untrusted:
            # Not a trusted proxy: its X-Forwarded-For is ignored, a new one each time changes nothing.
            statuses = [
                (await untrusted.get("/v1/tools", headers={"X-Forwarded-For": f"192.0.2.{n}"})).status_code
                for n in range(7)
            ]
            assert statuses == [401] * 5 + [429] * 2
            # Nor can it pass as the fresh client 203.0.113.8: it is still 127.0.0.2, over its rate.
            assert_edge_refusal(await untrusted.get("/v1/tools", headers={"X-Forwarded-For": "203.0.113.9"}))
    finally:
        server.process.stop()


async def test_with_redis_the_counts_are_shared_by_every_instance(tmp_path: Path) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"pacemaker-test:edge:{uuid.uuid4().hex[:12]}"
    edge = {"rate": "10/minute", "failed_auth": "10000/minute", "redis_prefix": prefix}
    limits = {"redis_url": SHARED_REDIS}
    a = edge_server(tmp_path, "a", edge, limits=limits)
    b = edge_server(tmp_path, "b", edge, limits=limits)
    redis = aioredis.Redis.from_url(SHARED_REDIS)
    try:
        async with client_from(a, "127.0.0.1") as at_a, client_from(b, "127.0.0.1") as at_b:
            statuses = []
            for n in range(10):
                statuses.append((await (at_a if n % 2 else at_b).get("/v1/tools")).status_code)
            assert statuses == [401] * 10
            # The address's 11th request, whichever instance it reaches, is over the shared rate.
            assert_edge_refusal(await at_a.get("/v1/tools"))
            assert_edge_refusal(await at_b.get("/v1/tools"))
        keys = [key.decode() async for key in redis.scan_iter(match=f"{prefix}:*")]
        assert f"{prefix}:r:127.0.0.1" in keys, keys
        assert int(await redis.get(f"{prefix}:r:127.0.0.1") or 0) == 12
        assert 0 < await redis.ttl(f"{prefix}:r:127.0.0.1") <= 60
    finally:
        a.process.stop()
        b.process.stop()
        async for key in redis.scan_iter(match=f"{prefix}:*"):
            await redis.delete(key)
        await redis.aclose()


async def test_redis_down_fails_open_to_counting_in_process_and_comes_back(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)  # our own: the test stops and starts it
    redis_server.start()
    rate_key = "pacemaker:edge:r:{}"  # the default prefix: this Redis is the test's alone
    server = edge_server(
        tmp_path,
        "outage",
        {"rate": "20/minute", "failed_auth": "10000/minute"},
        limits={"redis_url": redis_server.url},
    )
    try:
        redis = aioredis.Redis.from_url(redis_server.url)
        async with client_from(server, "127.0.0.1") as http:
            assert (await http.get("/v1/tools", headers=good(server))).status_code == 200  # now a known key
            assert (await http.get("/v1/tools")).status_code == 401
            assert int(await redis.get(rate_key.format("127.0.0.1")) or 0) == 2
            await redis.aclose()

            redis_server.kill()
            # Still served, without a hang or a 5xx: counted in process now, with the same limits.
            loop = asyncio.get_running_loop()
            started = loop.time()
            statuses = [(await http.get("/v1/tools")).status_code for _ in range(25)]
            assert loop.time() - started < 10
            assert statuses == [401] * 20 + [429] * 5, statuses
            # The known key is still served from the address over its rate (and the key limits fail open too).
            assert (await http.get("/v1/tools", headers=good(server))).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert metric(metrics, "pacemaker_edge_backend_errors_total") >= 1

        redis_server.start()  # empty: the shared counts start afresh, without a restart of ours
        await asyncio.sleep(1.2)  # the cool-down before Redis is tried again
        redis = aioredis.Redis.from_url(redis_server.url)
        try:
            async with client_from(server, "127.0.0.2") as other:
                deadline = loop.time() + 10
                while int(await redis.get(rate_key.format("127.0.0.2")) or 0) == 0:
                    assert loop.time() < deadline, "the edge never counted in Redis again"
                    assert (await other.get("/v1/tools")).status_code == 401
                    await asyncio.sleep(0.1)
        finally:
            await redis.aclose()
    finally:
        server.process.stop()
        redis_server.kill()
    log = server.process.output()
    assert log.count("edge limits: Redis unavailable") == 1, log  # once per outage, not per request
    assert "edge limits: Redis is answering again" in log


async def test_an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_address_as_itself(tmp_path: Path) -> None:
    # One IPv6 host usually holds a whole /64: if every address of it had its own allowance, a new source
    # address per request would make failed_auth (and the rate) count nothing at all.
    server = edge_server(
        tmp_path,
        "ipv6",
        {"rate": "100000/minute", "failed_auth": "3/minute"},
        server={"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
    )
    try:
        async with client_from(server, "127.0.0.1") as proxy:

            async def from_address(address: str) -> int:
                response = await proxy.get("/v1/tools", headers={"X-Forwarded-For": address, **bad_key()})
                return response.status_code

            same_64 = [await from_address(f"2001:db8:1:2:{n:x}::{n + 1:x}") for n in range(6)]
            assert same_64 == [401] * 3 + [429] * 3, same_64
            # Another /64 of the same /48 is another client.
            assert await from_address("2001:db8:1:3::1") == 401
            # ::ffff:198.51.100.9 is 198.51.100.9, however it is written.
            mapped = [await from_address(a) for a in ("198.51.100.9", "::ffff:198.51.100.9", "::ffff:c633:6409")]
            assert mapped == [401] * 3, mapped
            assert await from_address("198.51.100.9") == 429
            metrics = (await proxy.get("/metrics")).text
            assert metric(metrics, 'pacemaker_edge_refusals_total{reason="failed_auth"}') == 4
    finally:
        server.process.stop()


async def test_with_redis_a_client_retrying_at_its_retry_after_is_served(tmp_path: Path) -> None:
    # Redis's TTL is whole seconds, rounded to the nearest: a window with 2.25 s left was said to end in 2 s,
    # so a client that waited its Retry-After came back while the window was still full, and was refused again.
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    server = edge_server(
        tmp_path,
        "retry-after",
        {"rate": "2/3 seconds", "failed_auth": "10000/minute"},
        limits={"redis_url": redis_server.url},
    )
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        async with client_from(server, "127.0.0.1") as http:
            assert [(await http.get("/v1/tools")).status_code for _ in range(2)] == [401, 401]
            left = await redis.pttl("pacemaker:edge:r:127.0.0.1") / 1000
            await asyncio.sleep(max(left - 2.25, 0))  # over the rate with 2.25 s of the window left
            refused = await http.get("/v1/tools")
            assert_edge_refusal(refused)
            await asyncio.sleep(int(refused.headers["retry-after"]))
            retried = await http.get("/v1/tools")
            assert retried.status_code == 401, (refused.headers["retry-after"], retried.text)
    finally:
        await redis.aclose()
        server.process.stop()
        redis_server.kill()
