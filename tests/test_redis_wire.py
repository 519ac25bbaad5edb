"""The limiter's own script client (app/enforcement/redis_wire.py) against a redis-server of the test's own:
the same answers as redis-py's, replies matched to their commands under concurrency and cancellation,
and what becomes of every command when Redis is killed, restarted, frozen or flushed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.enforcement.limits import LimitSpec
from app.enforcement.redis_limiter import RedisLimiter, build_redis, limiter_scripts
from app.enforcement.redis_wire import RespScripts, supports
from tests.support import RedisServer

ZERO = Decimal(0)
ECHO = "return {ARGV[1], tonumber(ARGV[2]), KEYS[1]}"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = build_redis(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def scripts(redis_server: RedisServer) -> AsyncIterator[RespScripts]:
    made = RespScripts(redis_server.url, timeout_s=0.5)
    yield made
    await made.aclose()


def test_only_plain_redis_urls_are_served_here() -> None:
    assert supports("redis://127.0.0.1:6379/0") and supports("redis://:secret@redis:6380/2")
    assert supports("redis://user:pass@host")
    for other in (
        "rediss://host:6379/0",
        "unix:///run/redis.sock",
        "redis://host:6379/0?ssl_cert_reqs=none",
        "redis://host:6379/x",
        "x",
    ):
        assert not supports(other), other
    assert limiter_scripts("rediss://host:6379/0") is None and limiter_scripts(None) is None


async def test_the_limiter_answers_the_same_through_either_client(client: Redis, scripts: RespScripts) -> None:
    """The same sequence of admits and settles, through redis-py and through the script client, on two
    prefixes of the same Redis: every answer and the state left behind are the same."""
    spec = LimitSpec(rpm=600, burst=5, tpm=10_000, budget_usd=Decimal("1"))
    by_redis_py = RedisLimiter(client, prefix=f"pm-test:{uuid.uuid4().hex}")
    by_scripts = RedisLimiter(client, prefix=f"pm-test:{uuid.uuid4().hex}", scripts=scripts)
    answers: dict[str, list[object]] = {"redis-py": [], "scripts": []}
    for name, limiter in (("redis-py", by_redis_py), ("scripts", by_scripts)):
        for tokens in (100, 2_000, 9_000, 50, 1, 1, 1):  # through the token bucket, then the request burst
            admission = await limiter.admit(7, spec, tokens=tokens, cost_usd=Decimal("0.01"))
            answers[name].append((admission.allowed, admission.reason, admission.budget_remaining_usd))
            if admission.reservation is not None:
                await limiter.settle(7, spec, admission.reservation, actual_tokens=tokens // 2, actual_cost_usd=ZERO)
    assert answers["redis-py"] == answers["scripts"]
    assert any(not allowed for allowed, _, _ in answers["scripts"])  # the sequence reached a refusal
    for key_a, key_b in zip(by_redis_py.keys_for(7), by_scripts.keys_for(7), strict=True):
        assert await client.type(key_a) == await client.type(key_b)


async def test_concurrent_commands_each_get_their_own_reply(scripts: RespScripts) -> None:
    echo = scripts.script(ECHO)

    async def one(n: int) -> None:
        assert await echo(keys=[f"k{n}"], args=[f"v{n}", n]) == [f"v{n}".encode(), n, f"k{n}".encode()]

    await asyncio.gather(*(one(n) for n in range(500)))  # pipelined on a few connections


async def test_a_caller_that_gives_up_leaves_the_others_their_replies(scripts: RespScripts) -> None:
    echo = scripts.script(ECHO)
    slow = scripts.script(
        "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); "
        "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 50000 then break end end; return 1"
    )
    await echo(keys=["warm"], args=["x", 1])
    gave_up = asyncio.ensure_future(slow(keys=["s"], args=[]))
    others = [asyncio.ensure_future(echo(keys=[f"k{n}"], args=[f"v{n}", n])) for n in range(20)]
    await asyncio.sleep(0.01)
    gave_up.cancel()  # a client gone while its command is in flight
    for n, other in enumerate(others):
        assert await other == [f"v{n}".encode(), n, f"k{n}".encode()]
    assert await echo(keys=["after"], args=["y", 2]) == [b"y", 2, b"after"]


async def test_an_error_reply_is_a_response_error_and_the_connection_goes_on(scripts: RespScripts) -> None:
    with pytest.raises(ResponseError, match="nope"):
        await scripts.script("return redis.error_reply('ERR nope')")(keys=[], args=[])
    assert await scripts.script(ECHO)(keys=["k"], args=["v", 3]) == [b"v", 3, b"k"]


async def test_a_flushed_script_cache_is_refilled_by_sending_the_script(client: Redis, scripts: RespScripts) -> None:
    echo = scripts.script(ECHO)
    assert await echo(keys=["k"], args=["v", 1]) == [b"v", 1, b"k"]
    await client.script_flush()
    assert await echo(keys=["k"], args=["w", 2]) == [b"w", 2, b"k"]  # NOSCRIPT, then EVAL


async def test_killed_then_restarted_fails_fast_then_answers_with_no_command_sent_twice(
    redis_server: RedisServer, client: Redis, scripts: RespScripts
) -> None:
    counter = scripts.script("return redis.call('INCR', KEYS[1])")
    assert await counter(keys=["wire-test:count"], args=[]) == 1
    redis_server.kill()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            await counter(keys=["wire-test:count"], args=[])
        assert time.monotonic() - started < 1.0
    redis_server.start()  # empty: the count starts again
    assert await counter(keys=["wire-test:count"], args=[]) == 1  # the failed ones were never sent again
    assert await counter(keys=["wire-test:count"], args=[]) == 2


async def test_a_restart_between_commands_costs_no_failed_command(
    redis_server: RedisServer, scripts: RespScripts
) -> None:
    echo = scripts.script(ECHO)
    await asyncio.gather(*(echo(keys=[f"k{n}"], args=["v", n]) for n in range(64)))  # several connections open
    redis_server.kill()
    redis_server.start()
    await asyncio.sleep(0.05)  # the closed connections are noticed as they close
    results = await asyncio.gather(*(echo(keys=[f"k{n}"], args=["v", n]) for n in range(64)))
    assert [result[1] for result in results] == list(range(64))


async def test_a_frozen_redis_times_out_every_command_then_answers_when_it_thaws(
    redis_server: RedisServer, scripts: RespScripts
) -> None:
    echo = scripts.script(ECHO)
    await echo(keys=["k"], args=["v", 1])
    redis_server.pause()
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(echo(keys=["k"], args=["v", n]) for n in range(10)), return_exceptions=True)
        assert all(isinstance(outcome, TimeoutError) for outcome in outcomes), outcomes
        assert time.monotonic() - started < 2.0  # the timeout (0.5 s), not a hang
    finally:
        redis_server.resume()
    assert await echo(keys=["k"], args=["w", 2]) == [b"w", 2, b"k"]  # a fresh connection, nothing mismatched


async def test_the_url_s_database_and_password_are_used_on_every_connection(
    redis_server: RedisServer, client: Redis
) -> None:
    setter = "redis.call('SET', KEYS[1], ARGV[1]); return 1"
    in_three = RespScripts(redis_server.url.replace("/0", "/3"), timeout_s=0.5)
    try:
        assert await in_three.script(setter)(keys=["wire-test:db"], args=["three"]) == 1
    finally:
        await in_three.aclose()
    assert await client.get("wire-test:db") is None  # not in database 0
    db3 = build_redis(redis_server.url.replace("/0", "/3"))
    try:
        assert await db3.get("wire-test:db") == b"three"
    finally:
        await db3.aclose()

    await client.config_set("requirepass", "s3cret")
    host = redis_server.url.removeprefix("redis://")
    with_password, without = (
        RespScripts(f"redis://:s3cret@{host}", timeout_s=0.5),
        RespScripts(redis_server.url, timeout_s=0.5),
    )
    try:
        assert await with_password.script(ECHO)(keys=["k"], args=["v", 1]) == [b"v", 1, b"k"]
        with pytest.raises(ResponseError, match="NOAUTH"):
            await without.script(ECHO)(keys=["k"], args=["v", 1])
    finally:
        await with_password.aclose()
        await without.aclose()


async def test_a_connect_that_fails_while_connections_are_open_does_not_fail_the_command(
    redis_server: RedisServer,
) -> None:
    """Every open connection busy, room for another, and the new connect fails (Redis at its client limit,
    say): the command goes on an open connection instead of failing as an outage."""
    scripts = RespScripts(redis_server.url, timeout_s=0.5, connections=2)
    echo = scripts.script(ECHO)
    try:
        await echo(keys=["k"], args=["v", 0])  # one connection open
        scripts._port = 1  # the next connect is refused
        results = await asyncio.gather(*(echo(keys=["k"], args=["v", n]) for n in range(20)))
        assert [result[1] for result in results] == list(range(20))
    finally:
        await scripts.aclose()


async def test_aclose_during_a_connect_leaves_nothing_open_and_fails_as_a_connection_error(
    redis_server: RedisServer,
) -> None:
    scripts = RespScripts(redis_server.url, timeout_s=0.5)
    echo = scripts.script(ECHO)
    waiting = asyncio.ensure_future(echo(keys=["k"], args=["v", 1]))
    await asyncio.sleep(0)  # the connect has begun
    await scripts.aclose()
    with pytest.raises(ConnectionError):
        await waiting
    assert not scripts._open
    with pytest.raises(ConnectionError):
        await echo(keys=["k"], args=["v", 2])
