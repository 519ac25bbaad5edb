"""The Redis limiter against a real Redis: atomic admits and seeds under concurrency, server-clock periods, expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from app.enforcement.limits import Admission, LimitSpec, Period, PeriodSpend, Reservation
from app.enforcement.redis_limiter import LUA_PRELUDE, RedisLimiter
from tests.support import require_service

ZERO = Decimal(0)


async def seed(limiter: RedisLimiter, key_id: int, spec: LimitSpec, spent: Decimal = ZERO) -> Period:
    """Seed a budget as the Enforcer does: the limiter names the period it lacks, which is then seeded."""
    asked = await limiter.admit(key_id, spec, tokens=0, cost_usd=ZERO)
    assert asked.reason == "seed" and asked.period is not None and not asked.allowed
    await limiter.seed(key_id, spec, PeriodSpend(asked.period, spent))
    return asked.period


def taken(admission: Admission) -> Reservation:
    assert admission.reservation is not None, admission
    return admission.reservation


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    require_service("Redis", "127.0.0.1", 6379)
    # These tests are about the scripts, not timeouts: a client with the default (patient)
    # timeouts, so that 200 concurrent connects on a loaded CI machine do not fail the 250 ms
    # connect timeout of the production client (whose fail-fast is tested with the ResilientLimiter).
    pool = BlockingConnectionPool.from_url("redis://127.0.0.1:6379/0", max_connections=64, timeout=30)
    client = Redis.from_pool(pool)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"pacemaker-test:{uuid.uuid4().hex}"


@pytest.fixture
async def limiter(redis: Redis, prefix: str) -> AsyncIterator[RedisLimiter]:
    yield RedisLimiter(redis, prefix=prefix)
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


async def test_burst_is_admitted_then_the_next_request_is_refused_with_a_retry_time(limiter: RedisLimiter) -> None:
    spec = LimitSpec(rpm=6, burst=3)  # one request per ten seconds
    answers = [await limiter.admit(1, spec, tokens=0, cost_usd=ZERO) for _ in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    refused = answers[-1]
    assert refused.reason == "rpm" and refused.retry_after_s is not None
    assert 9.0 < refused.retry_after_s <= 10.0
    assert refused.requests is not None and (refused.requests.limit, refused.requests.remaining) == (3, 0)


async def test_waiting_the_retry_time_is_enough(limiter: RedisLimiter) -> None:
    spec = LimitSpec(rpm=600, burst=1)  # ten per second
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).allowed
    refused = await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert refused.reason == "rpm" and refused.retry_after_s is not None
    assert 0 < refused.retry_after_s <= 0.1
    await asyncio.sleep(refused.retry_after_s + 0.01)
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).allowed


async def test_concurrent_admits_take_exactly_the_burst(limiter: RedisLimiter) -> None:
    spec = LimitSpec(rpm=1, burst=50)  # a refill of one a minute cannot add one during the test
    answers = await asyncio.gather(*(limiter.admit(3, spec, tokens=0, cost_usd=ZERO) for _ in range(200)))
    assert sum(a.allowed for a in answers) == 50
    assert {a.reason for a in answers if not a.allowed} == {"rpm"}


async def test_concurrent_admits_never_overspend_the_budget(limiter: RedisLimiter) -> None:
    spec = LimitSpec(budget_usd=Decimal("1.05"))
    await seed(limiter, 4, spec)
    answers = await asyncio.gather(*(limiter.admit(4, spec, tokens=0, cost_usd=Decimal("0.1")) for _ in range(100)))
    assert sum(a.allowed for a in answers) == 10
    refused = [a for a in answers if not a.allowed]
    assert all(a.reason == "budget" and a.retry_after_s is None for a in refused)
    assert refused[0].budget_remaining_usd == Decimal("0.05")


async def test_settle_gives_tokens_back_and_an_overshoot_must_be_paid_back(limiter: RedisLimiter) -> None:
    spec = LimitSpec(tpm=6000)  # a hundred tokens per second
    admitted = await limiter.admit(5, spec, tokens=5000, cost_usd=ZERO)
    assert admitted.tokens is not None and admitted.tokens.remaining in (1000, 1001)
    await limiter.settle(5, spec, taken(admitted), actual_tokens=1000, actual_cost_usd=ZERO)
    again = await limiter.admit(5, spec, tokens=5000, cost_usd=ZERO)
    assert again.allowed and again.tokens is not None and again.tokens.remaining < 100
    # 11000 used against 5000 reserved: the bucket goes about 6000 below zero, 61 s from holding 100.
    await limiter.settle(5, spec, taken(again), actual_tokens=11000, actual_cost_usd=ZERO)
    refused = await limiter.admit(5, spec, tokens=100, cost_usd=ZERO)
    assert refused.reason == "tpm" and refused.retry_after_s is not None
    assert 60.0 < refused.retry_after_s <= 61.0
    assert refused.tokens is not None and refused.tokens.remaining == 0


async def test_a_request_larger_than_the_tpm_capacity_never_fits(limiter: RedisLimiter) -> None:
    refused = await limiter.admit(6, LimitSpec(tpm=100), tokens=101, cost_usd=ZERO)
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "tpm", None)


async def test_settling_to_the_actual_cost_frees_the_rest_of_the_reservation(
    limiter: RedisLimiter, redis: Redis
) -> None:
    spec = LimitSpec(budget_usd=Decimal(2), budget_period="day")
    await seed(limiter, 7, spec)
    first = await limiter.admit(7, spec, tokens=0, cost_usd=Decimal(1))
    assert (await limiter.admit(7, spec, tokens=0, cost_usd=Decimal(1))).allowed
    assert (await limiter.admit(7, spec, tokens=0, cost_usd=Decimal("0.5"))).reason == "budget"
    await limiter.settle(7, spec, taken(first), actual_tokens=0, actual_cost_usd=Decimal("0.25"))
    admitted = await limiter.admit(7, spec, tokens=0, cost_usd=Decimal("0.5"))
    assert admitted.allowed and admitted.budget_remaining_usd == Decimal("0.25")
    _, _, budget_key = limiter.keys_for(7)
    assert await redis.hget(budget_key, "spent") == b"1750000000"  # integer nano-USD


async def test_refusals_take_nothing(limiter: RedisLimiter) -> None:
    spec = LimitSpec(rpm=60, burst=2, tpm=1000, budget_usd=Decimal(10))
    await seed(limiter, 8, spec)
    assert (await limiter.admit(8, spec, tokens=900, cost_usd=Decimal(1))).allowed
    refused = await limiter.admit(8, spec, tokens=200, cost_usd=Decimal(1))
    assert refused.reason == "tpm"
    assert refused.requests is not None and refused.requests.remaining == 1
    assert refused.budget_remaining_usd == Decimal(9)


async def test_unlimited_dimensions_admit_everything_and_store_nothing(limiter: RedisLimiter, redis: Redis) -> None:
    for _ in range(20):
        answer = await limiter.admit(9, LimitSpec(), tokens=10**9, cost_usd=Decimal(10**6))
        assert answer.allowed and (answer.requests, answer.tokens, answer.budget_remaining_usd) == (None, None, None)
    assert await redis.exists(*limiter.keys_for(9)) == 0


async def test_bucket_keys_expire_once_refilled_and_budget_keys_at_the_end_of_their_period(
    limiter: RedisLimiter, redis: Redis
) -> None:
    spec = LimitSpec(rpm=60, burst=10, tpm=600, budget_usd=Decimal(5), budget_period="day")
    await seed(limiter, 10, spec)
    await limiter.admit(10, spec, tokens=300, cost_usd=Decimal(1))
    requests_key, tokens_key, budget_key = limiter.keys_for(10)
    assert 1000 < await redis.pttl(requests_key) <= 2000  # one second to refill one request, plus a margin
    assert 30_000 < await redis.pttl(tokens_key) <= 31_000  # thirty seconds for 300 tokens at ten a second
    seconds, _ = await redis.time()
    until_midnight_ms = (86400 - seconds % 86400) * 1000
    assert until_midnight_ms - 1000 < await redis.pttl(budget_key) <= until_midnight_ms + 1000
    await seed(limiter, 11, LimitSpec(budget_usd=Decimal(5)))
    await limiter.admit(11, LimitSpec(budget_usd=Decimal(5)), tokens=0, cost_usd=Decimal(1))
    assert await redis.ttl(limiter.keys_for(11)[2]) == -1  # a lifetime budget never expires


async def test_budget_periods_are_named_from_the_redis_server_clock(limiter: RedisLimiter, redis: Redis) -> None:
    day = await seed(limiter, 12, LimitSpec(budget_usd=Decimal(5), budget_period="day"))
    month = await seed(limiter, 13, LimitSpec(budget_usd=Decimal(5), budget_period="month"))
    seconds, _ = await redis.time()
    today = datetime.fromtimestamp(seconds, UTC)
    midnight = today.replace(hour=0, minute=0, second=0, microsecond=0)
    assert day == Period(today.strftime("%Y-%m-%d"), midnight)
    assert month == Period(today.strftime("%Y-%m"), midnight.replace(day=1))
    assert await redis.hget(limiter.keys_for(12)[2], "period") == today.strftime("%Y-%m-%d").encode()
    assert await redis.hget(limiter.keys_for(13)[2], "period") == today.strftime("%Y-%m").encode()


async def test_the_lua_calendar_matches_python_across_centuries(redis: Redis) -> None:
    check = redis.register_script(
        LUA_PRELUDE
        + """
local out = {}
for i = 1, #ARGV do
  local y, m, d = civil_from_days(tonumber(ARGV[i]))
  out[i] = string.format('%04d-%02d-%02d', y, m, d)
end
return out
"""
    )
    days = [*range(-800, 800), *range(-146097 * 3, 146097 * 3, 97)]
    answers = await check(keys=[], args=days)
    epoch = date(1970, 1, 1)
    assert [a.decode() for a in answers] == [(epoch + timedelta(days=n)).isoformat() for n in days]


@pytest.mark.parametrize(
    ("at", "kind", "period", "ends"),
    [
        ("2024-12-31T23:59:59", "day", "2024-12-31", "2025-01-01T00:00:00"),
        ("2024-12-31T23:59:59", "month", "2024-12", "2025-01-01T00:00:00"),
        ("2024-02-10T08:00:00", "month", "2024-02", "2024-03-01T00:00:00"),
        ("2100-02-10T08:00:00", "month", "2100-02", "2100-03-01T00:00:00"),
        ("2000-02-29T08:00:00", "month", "2000-02", "2000-03-01T00:00:00"),
        ("2025-04-30T00:00:00", "month", "2025-04", "2025-05-01T00:00:00"),
        ("2025-04-30T00:00:00", "", "life", None),
    ],
)
async def test_the_lua_period_ends_at_the_utc_boundary(
    redis: Redis, at: str, kind: str, period: str, ends: str | None
) -> None:
    check = redis.register_script(
        LUA_PRELUDE
        + """
now = tonumber(ARGV[1])
local id, ends_in = period(ARGV[2])
return {id, ends_in and fmt(ends_in) or ''}
"""
    )
    now = datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp()
    period_id, ends_in = await check(keys=[], args=[now, kind])
    assert period_id.decode() == period
    if ends is None:
        assert ends_in == b""
    else:
        assert now + float(ends_in) == datetime.fromisoformat(ends).replace(tzinfo=UTC).timestamp()


async def test_an_admit_is_one_evalsha_of_a_cached_script(limiter: RedisLimiter, redis: Redis) -> None:
    await limiter.admit(14, LimitSpec(rpm=10), tokens=0, cost_usd=ZERO)
    before = await redis.info("commandstats")
    await limiter.admit(14, LimitSpec(rpm=10, tpm=100, budget_usd=Decimal(1)), tokens=1, cost_usd=ZERO)
    after = await redis.info("commandstats")
    # Other tests may share this Redis, so only the minimum is certain: our call was an EVALSHA.
    assert after["cmdstat_evalsha"]["calls"] >= before["cmdstat_evalsha"]["calls"] + 1


# Seeding: a budget's spend comes from the durable record whenever Redis holds no state for the period.


async def test_a_lost_budget_key_asks_for_a_seed_and_the_admit_takes_nothing(
    limiter: RedisLimiter, redis: Redis
) -> None:
    spec = LimitSpec(rpm=60, burst=1, budget_usd=Decimal(10))
    await seed(limiter, 20, spec, spent=Decimal(4))
    await redis.delete(limiter.keys_for(20)[2])  # a FLUSHALL, an eviction, a restart without persistence
    asked = await limiter.admit(20, spec, tokens=0, cost_usd=Decimal(1))
    assert (asked.reason, asked.period, asked.reservation) == ("seed", Period("life", None), None)
    await limiter.seed(20, spec, PeriodSpend(Period("life", None), Decimal(4)))
    admitted = await limiter.admit(20, spec, tokens=0, cost_usd=Decimal(1))
    # The burst of one is still there: neither answer "seed" took the request.
    assert admitted.allowed and admitted.budget_remaining_usd == Decimal(5)


async def test_instances_seeding_one_key_at_once_count_the_spend_once(limiter: RedisLimiter, prefix: str) -> None:
    spec = LimitSpec(budget_usd=Decimal(10), budget_period="month")
    asked = await limiter.admit(21, spec, tokens=0, cost_usd=ZERO)
    assert asked.period is not None
    # Two instances (two clients), each with many requests waiting for the same seed.
    clients = [Redis.from_pool(BlockingConnectionPool.from_url("redis://127.0.0.1:6379/0", timeout=30)) for _ in "ab"]
    try:
        instances = [RedisLimiter(client, prefix=prefix) for client in clients]
        spend = PeriodSpend(asked.period, Decimal(3))
        await asyncio.gather(*(instance.seed(21, spec, spend) for instance in instances for _ in range(25)))
    finally:
        for client in clients:
            await client.aclose()
    assert (await limiter.admit(21, spec, tokens=0, cost_usd=Decimal(1))).budget_remaining_usd == Decimal(6)
    await limiter.seed(21, spec, PeriodSpend(asked.period, Decimal(9)))  # a late seed changes nothing
    assert (await limiter.admit(21, spec, tokens=0, cost_usd=ZERO)).budget_remaining_usd == Decimal(6)


async def test_a_seed_read_for_another_period_is_ignored(limiter: RedisLimiter) -> None:
    spec = LimitSpec(budget_usd=Decimal(10), budget_period="day")
    await limiter.seed(22, spec, PeriodSpend(Period("1999-12-31", datetime(1999, 12, 31, tzinfo=UTC)), Decimal(9)))
    assert (await limiter.admit(22, spec, tokens=0, cost_usd=ZERO)).reason == "seed"


async def test_settling_after_the_key_was_lost_and_seeded_again_charges_the_call_in_full(
    limiter: RedisLimiter, redis: Redis
) -> None:
    spec = LimitSpec(budget_usd=Decimal(10), budget_period="day")
    await seed(limiter, 23, spec)
    in_flight = await limiter.admit(23, spec, tokens=0, cost_usd=Decimal(1))
    await redis.delete(limiter.keys_for(23)[2])
    # Settled while the key is gone: nothing to settle into, and nothing is created.
    lost = await limiter.admit(23, spec, tokens=0, cost_usd=ZERO)
    assert lost.reason == "seed"
    await limiter.settle(23, spec, taken(in_flight), actual_tokens=0, actual_cost_usd=Decimal("0.5"))
    assert await redis.exists(limiter.keys_for(23)[2]) == 0
    # Seeded again (2 USD of other requests), then a call admitted before the loss settles.
    assert lost.period is not None
    await limiter.seed(23, spec, PeriodSpend(lost.period, Decimal(2)))
    await limiter.settle(23, spec, taken(in_flight), actual_tokens=0, actual_cost_usd=Decimal("0.25"))
    # Neither a refund of the lost 1 USD reservation from the seeded 2 USD, nor nothing: 2 + 0.25.
    assert (await limiter.admit(23, spec, tokens=0, cost_usd=ZERO)).budget_remaining_usd == Decimal("7.75")


async def test_a_budget_hash_written_before_seeding_existed_keeps_working(limiter: RedisLimiter, redis: Redis) -> None:
    spec = LimitSpec(budget_usd=Decimal(10))
    await redis.hset(limiter.keys_for(24)[2], mapping={"period": "life", "spent": 4_000_000_000})
    admitted = await limiter.admit(24, spec, tokens=0, cost_usd=Decimal(1))
    assert admitted.allowed and admitted.budget_remaining_usd == Decimal(5)
    await limiter.settle(24, spec, taken(admitted), actual_tokens=0, actual_cost_usd=Decimal("0.5"))
    assert await redis.hget(limiter.keys_for(24)[2], "spent") == b"4500000000"
