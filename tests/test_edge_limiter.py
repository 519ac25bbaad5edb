"""The edge limiter in process: its counters, blocks, lookup gate and fail-open, on fake clocks and storages.

The same behaviour on real server processes, PostgreSQL and Redis is in tests/test_edge_limits.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import pytest
from limits.aio.storage import Storage
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from app.auth.authenticator import Authenticator
from app.auth.repository import ApiKeyRepository
from app.config import ConfigError, DatabaseSettings, load_settings
from app.db import create_engine, create_session_maker, migrate, session_scope
from app.edge.limiter import EdgeLimiter, counted_as
from app.edge.metrics import EdgeMetrics
from app.edge.middleware import exempt
from app.edge.settings import EdgeSettings
from app.edge.storage import BoundedMemoryStorage
from app.errors import EdgeRateLimited, Unauthenticated


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(rate: str = "5/minute", failed_auth: str = "3/minute", **kwargs: Any) -> tuple[EdgeLimiter, Clock]:
    clock = Clock()
    settings = EdgeSettings(rate=rate, failed_auth=failed_auth, max_addresses=kwargs.pop("max_addresses", 100))
    metrics = EdgeMetrics.register(CollectorRegistry())
    return EdgeLimiter(settings, metrics, clock=clock, wall=clock, **kwargs), clock


def test_settings_take_one_rate_in_limits_notation() -> None:
    assert EdgeSettings(rate="100 per second", failed_auth="5/10 seconds").failed_auth == "5/10 seconds"
    for bad in ("x", "10/minute;20/hour", "0/minute", "-1/minute"):
        with pytest.raises(ValueError, match="rate"):
            EdgeSettings(rate=bad)


def test_settings_come_from_the_environment_and_defaults_are_on(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings().server.edge
    assert (defaults.enabled, defaults.rate, defaults.failed_auth, defaults.storage) == (
        True,
        "6000/minute",
        "20/minute",
        "auto",
    )
    monkeypatch.setenv("PACEMAKER_SERVER__EDGE__FAILED_AUTH", "5/minute")
    assert load_settings().server.edge.failed_auth == "5/minute"
    monkeypatch.setenv("PACEMAKER_SERVER__EDGE__RATE", "fast")
    with pytest.raises(ConfigError, match=r"server\.edge\.rate"):
        load_settings()


def test_exempt_paths_are_the_operational_ones_and_what_is_under_them() -> None:
    for path in ("/health", "/health/ready", "/metrics", "/docs", "/docs/assets/x.css", "/dashboard/assets/a.js"):
        assert exempt(path), path
    for path in ("/v1/tasks", "/v1/ws", "/healthz", "/metricsfoo", "/dashboards", "/", "/v1/health"):
        assert not exempt(path), path


async def test_memory_counters_are_fixed_windows_and_bounded() -> None:
    clock = Clock()
    storage = BoundedMemoryStorage(max_keys=3, clock=clock)
    assert [await storage.incr("a", 60) for _ in range(3)] == [1, 2, 3]
    assert await storage.get_expiry("a") == 1060
    clock.now += 60
    assert await storage.get("a") == 0
    assert await storage.incr("a", 60) == 1  # a new window
    for key in ("b", "c", "d", "e"):
        await storage.incr(key, 60)
    assert len(storage) == 3  # the oldest windows went first
    assert await storage.get("e") == 1 and await storage.get("a") == 0
    # Expired windows are dropped as new keys come, not kept until the cap.
    clock.now += 61
    for key in ("f", "g"):
        await storage.incr(key, 60)
    assert len(storage) <= 3 and await storage.get("c") == 0


async def test_an_address_over_its_rate_is_blocked_until_its_window_ends() -> None:
    edge, clock = limiter(rate="5/minute")
    assert [await edge.admit("10.0.0.1") for _ in range(5)] == [None] * 5
    block = await edge.admit("10.0.0.1")
    assert block is not None and block.reason == "rate"
    assert block.refusal(clock()).response_headers()["Retry-After"] == "60"
    assert await edge.admit("10.0.0.2") is None  # another address
    clock.now += 30
    assert await edge.admit("10.0.0.1") is block
    assert block.refusal(clock()).response_headers()["Retry-After"] == "30"
    clock.now += 30
    assert await edge.admit("10.0.0.1") is None


async def test_failed_authentications_block_and_the_gate_bounds_lookups_in_flight() -> None:
    edge, clock = limiter(failed_auth="3/minute")
    # Three lookups in flight at once from one address: the limit. A fourth would cost more than it.
    for _ in range(3):
        edge.lookup_started("10.0.0.1")
    with pytest.raises(EdgeRateLimited):
        edge.lookup_started("10.0.0.1")
    edge.lookup_started("10.0.0.2")  # another address has its own
    # The refusal blocked the address for a second (lookups in flight filled the limit, none failed yet).
    block = await edge.admit("10.0.0.1")
    assert block is not None and block.reason == "failed_auth"
    # Two succeed, one fails: room for two more.
    edge.lookup_ended("10.0.0.1")
    edge.lookup_ended("10.0.0.1")
    edge.lookup_ended("10.0.0.1")
    await edge.auth_failed("10.0.0.1")
    clock.now += 1.5
    assert await edge.admit("10.0.0.1") is None
    edge.lookup_started("10.0.0.1")
    edge.lookup_ended("10.0.0.1")
    await edge.auth_failed("10.0.0.1")
    edge.lookup_started("10.0.0.1")
    edge.lookup_ended("10.0.0.1")
    await edge.auth_failed("10.0.0.1")  # the third: blocked for the rest of the failures' window
    block = await edge.admit("10.0.0.1")
    assert block is not None and block.reason == "failed_auth"
    with pytest.raises(EdgeRateLimited) as refused:
        edge.lookup_started("10.0.0.1")
    assert int(refused.value.response_headers()["Retry-After"]) == 59
    clock.now += 60
    assert await edge.admit("10.0.0.1") is None
    edge.lookup_started("10.0.0.1")


async def test_in_process_state_stays_bounded_under_a_flood_of_addresses() -> None:
    edge, _clock = limiter(rate="1/minute", failed_auth="1/minute", max_addresses=100)
    for n in range(5000):
        address = f"2001:db8:{n:x}::1"  # a /64 each (the addresses of one /64 count as one)
        await edge.admit(address)
        await edge.admit(address)  # over: blocked
        await edge.auth_failed(address)
    assert len(edge._blocked) <= 100 and len(edge._failures) <= 100 and len(edge._local) <= 200
    assert not edge._pending


def test_ipv6_addresses_count_by_network_and_mapped_ones_as_ipv4() -> None:
    assert counted_as("203.0.113.5") == "203.0.113.5"
    assert counted_as("2001:db8:1:2::5") == counted_as("2001:DB8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert counted_as("2001:db8:1:3::5") == "2001:db8:1:3::/64"
    assert counted_as("2001:db8:1:2::5", 128) == "2001:db8:1:2::5/128"
    assert counted_as("::ffff:203.0.113.5") == counted_as("::ffff:cb00:7105") == "203.0.113.5"
    assert counted_as("unknown") == "unknown" and counted_as("[::1]:80") == "[::1]:80"  # not addresses: as they are
    with pytest.raises(ValueError, match="ipv6_prefix"):
        EdgeSettings(ipv6_prefix=16)


class FlakyStorage(BoundedMemoryStorage):
    """A shared storage that can be taken down: every call then fails as a dead Redis does."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.calls = 0

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("Connection refused")
        return await super().incr(key, expiry, amount)

    async def get_expiry(self, key: str) -> float:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("Connection refused")
        return await super().get_expiry(key)


async def test_a_failing_shared_storage_fails_open_logs_once_and_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    shared = FlakyStorage(clock)
    assert isinstance(shared, Storage)
    settings = EdgeSettings(rate="3/minute", failed_auth="3/minute")
    metrics = EdgeMetrics.register(CollectorRegistry())
    edge = EdgeLimiter(settings, metrics, shared=shared, clock=clock, wall=clock, cooldown_s=1.0)
    assert await edge.admit("a") is None and shared.calls == 1
    shared.down = True
    with caplog.at_level(logging.INFO, logger="app.edge.limiter"):
        # Counted in process, with the same limit, with one failed call to Redis per cool-down, not per request.
        assert [await edge.admit("a") is None for _ in range(4)] == [True, True, True, False]
        assert edge.degraded and shared.calls == 2
        clock.now += 1.1
        await edge.admit("b")
        assert shared.calls == 3  # one probe after the cool-down (still down)
        shared.down = False
        clock.now += 1.1
        assert await edge.admit("c") is None
        assert not edge.degraded and shared.calls == 4
    messages = [record.getMessage() for record in caplog.records]
    assert sum("Redis unavailable" in message for message in messages) == 1
    assert sum("answering again" in message for message in messages) == 1
    assert metrics.backend_errors._value.get() == 2


async def test_a_count_not_waited_for_is_still_counted_and_blocks_the_requests_after_it() -> None:
    clock = Clock()
    shared = SlowStorage(clock)
    metrics = EdgeMetrics.register(CollectorRegistry())
    edge = EdgeLimiter(EdgeSettings(rate="3/minute"), metrics, shared=shared, clock=clock, wall=clock)
    for _ in range(4):
        edge.admit_later("a")  # requests with a known key: served without waiting for Redis
    assert shared.answered == 0  # nothing has waited for the storage
    await edge.counted()
    assert shared.answered == 4 + 1  # four counts, and the window's end read for the block
    block = await edge.admit("a")  # the fourth put the address over: a request with no known key waits
    assert block is not None and block.reason == "rate"
    assert metrics.known_key._value.get() == 1  # the known-key request served over the limit
    await edge.counted()  # nothing in flight: returns at once


class SlowStorage(BoundedMemoryStorage):
    """A shared storage that answers only after a turn of the event loop, as Redis does."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.answered = 0

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        await asyncio.sleep(0)
        self.answered += 1
        return await super().incr(key, expiry, amount)

    async def get_expiry(self, key: str) -> float:
        await asyncio.sleep(0)
        self.answered += 1
        return await super().get_expiry(key)


class CountingAuthenticator(Authenticator):
    lookups = 0

    async def _load(self, key_hash: str) -> Any:
        self.lookups += 1
        await asyncio.sleep(0.01)  # long enough for the others to arrive while it is in flight
        return await super()._load(key_hash)


@pytest.fixture
def migrated_sqlite(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'edge.db'}"
    migrate(url)
    return url


async def test_the_authenticator_asks_the_gate_only_for_keys_it_does_not_know(migrated_sqlite: str) -> None:
    engine = create_engine(DatabaseSettings(url=migrated_sqlite))
    session_maker = create_session_maker(engine)
    edge, clock = limiter(failed_auth="3/minute")
    authenticator = CountingAuthenticator(session_maker, cache_seconds=10, cache_size=100, clock=clock, guard=edge)
    try:
        async with session_scope(session_maker) as session:
            _row, key = await ApiKeyRepository(session).create("known")
        # 64 requests of one good key at once (a cold start): one lookup, one slot, none refused.
        principals = await asyncio.gather(*(authenticator.authenticate(key, client="10.0.0.1") for _ in range(64)))
        assert {p.name for p in principals} == {"known"} and authenticator.lookups == 1

        # Ten different bad keys at once from one address: the limit's three are looked up, seven refused.
        outcomes = await asyncio.gather(
            *(authenticator.authenticate(f"pk_bad{n}", client="10.0.0.1") for n in range(10)), return_exceptions=True
        )
        assert (
            sorted(type(outcome).__name__ for outcome in outcomes) == ["EdgeRateLimited"] * 7 + ["Unauthenticated"] * 3
        )
        assert authenticator.lookups == 4
        assert authenticator.knows(key) and not authenticator.knows("pk_bad0") and not authenticator.knows(None)
        # Blocked now; yet the known key, its cache entry expired, is looked up again (at most once per TTL).
        clock.now += 11
        assert (await authenticator.authenticate(key, client="10.0.0.1")).name == "known"
        assert authenticator.lookups == 5
        # A missing key is a failed authentication too (counted, no lookup); with no address, no guard at all.
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(None, client="10.0.0.3")
        assert edge._failures_now("10.0.0.3", clock()) == 1
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate("pk_bad_no_address")
        assert authenticator.lookups == 6
    finally:
        await engine.dispose()


class SlowAuthenticator(Authenticator):
    """Every lookup takes 50 ms and finds `found` (a principal, or None for an unknown key)."""

    def __init__(self, guard: EdgeLimiter, found: Any) -> None:
        super().__init__(cast(Any, None), cache_seconds=10, cache_size=100, guard=guard)
        self.found = found
        self.lookups = 0

    async def _load(self, key_hash: str) -> Any:
        self.lookups += 1
        await asyncio.sleep(0.05)
        return self.found


async def test_a_request_waiting_on_a_lookup_that_is_cancelled_reads_the_key_itself() -> None:
    # A socket's key check (cancelled when the socket closes) was reading a key an HTTP request was waiting
    # on: the request ended with CancelledError, a 500, though nothing had cancelled it.
    edge, _clock = limiter(failed_auth="3/minute")
    principal = object()
    authenticator = SlowAuthenticator(edge, principal)
    reader = asyncio.create_task(authenticator.authenticate("pk_good", client="10.0.0.1"))
    await asyncio.sleep(0.01)
    waiters = [asyncio.create_task(authenticator.authenticate("pk_good", client="10.0.0.2")) for _ in range(3)]
    await asyncio.sleep(0.01)
    reader.cancel()
    assert await asyncio.gather(*waiters) == [principal] * 3
    assert reader.cancelled() and authenticator.lookups == 2  # the waiters' one read, through the gate
    assert not edge._pending  # neither lookup kept its slot

    # A bad key: the waiter's own read is gated and counted as its address's failure.
    authenticator = SlowAuthenticator(edge, None)
    reader = asyncio.create_task(authenticator.authenticate("pk_bad", client="10.0.0.3"))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(authenticator.authenticate("pk_bad", client="10.0.0.4"))
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(Unauthenticated):
        await waiter
    assert edge._failures_now("10.0.0.4", _clock()) == 1 and edge._failures_now("10.0.0.3", _clock()) == 0
    assert not edge._pending

    # A waiter that is itself cancelled still ends cancelled.
    reader = asyncio.create_task(authenticator.authenticate("pk_other", client="10.0.0.5"))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(authenticator.authenticate("pk_other", client="10.0.0.6"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with pytest.raises(Unauthenticated):
        await reader
