"""The resilient limiter: a Redis of our own is killed and restarted under it; it must never hang or lie."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from app.enforcement.limits import Admission, LimitSpec, Period, PeriodSpend, Reservation
from app.enforcement.memory_limiter import MemoryLimiter
from app.enforcement.redis_limiter import RedisLimiter, build_redis
from app.enforcement.redis_wire import RespScripts
from app.enforcement.resilient_limiter import ResilientLimiter
from app.errors import LimiterUnavailable
from tests.support import RedisServer

LOGGER = "app.enforcement.resilient_limiter"
ZERO = Decimal(0)
SPEC = LimitSpec(rpm=6000, burst=100, tpm=100_000)
LIFETIME = Period("life", None)
COOLDOWN_S = 0.3


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = build_redis(redis_server.url)
    yield redis
    await redis.aclose()


@dataclass
class Errors:
    count: int = 0

    def __call__(self) -> None:
        self.count += 1


def resilient(
    client: Redis, policy: str, errors: Errors, scripts: RespScripts | None = None
) -> tuple[ResilientLimiter, RedisLimiter]:
    primary = RedisLimiter(client, prefix=f"pacemaker-test:{uuid.uuid4().hex}", scripts=scripts)
    limiter = ResilientLimiter(
        primary,
        MemoryLimiter(scale=0.5),
        policy=policy,  # type: ignore[arg-type]
        expected_instances=2,
        on_error=errors,
        cooldown_s=COOLDOWN_S,
    )
    return limiter, primary


async def timed_admit(limiter: ResilientLimiter) -> tuple[Admission, float]:
    started = time.monotonic()
    answer = await limiter.admit(1, SPEC, tokens=10, cost_usd=Decimal("0.01"))
    return answer, time.monotonic() - started


def answered_by_redis(answer: Admission) -> bool:
    # The fallback holds half the limits (two expected instances): the bucket's size tells who answered.
    assert answer.requests is not None
    return answer.requests.limit == 100


async def test_fail_open_answers_locally_without_hanging_and_returns_to_redis_after_a_restart(
    redis_server: RedisServer, client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    errors = Errors()
    limiter, primary = resilient(client, "fail_open", errors)
    answer, _ = await timed_admit(limiter)
    assert answer.allowed and answered_by_redis(answer)

    redis_server.kill()
    for _ in range(20):
        answer, elapsed = await timed_admit(limiter)
        assert elapsed < 0.5
        assert answer.allowed and not answered_by_redis(answer)
    await limiter.settle(1, SPEC, Reservation(10, ZERO), actual_tokens=5, actual_cost_usd=ZERO)
    assert errors.count == 1  # the calls inside the cool-down did not even try Redis
    await asyncio.sleep(COOLDOWN_S)
    answer, elapsed = await timed_admit(limiter)  # a probe, which fails: still one warning
    assert elapsed < 0.5 and not answered_by_redis(answer)
    assert errors.count == 2

    redis_server.start()
    await asyncio.sleep(COOLDOWN_S)
    answer, _ = await timed_admit(limiter)
    assert answer.allowed and answered_by_redis(answer)
    assert await client.exists(primary.keys_for(1)[0]) == 1  # the restarted Redis holds the bucket
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    recoveries = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
    assert len(recoveries) == 1 and "answering again" in recoveries[0].getMessage()


async def test_fail_closed_refuses_with_limiter_unavailable_never_a_rate_limit_refusal(
    redis_server: RedisServer, client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    errors = Errors()
    limiter, _ = resilient(client, "fail_closed", errors)
    assert (await limiter.admit(1, SPEC, tokens=10, cost_usd=ZERO)).allowed

    redis_server.kill()
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable) as refused:
            await limiter.admit(1, SPEC, tokens=10, cost_usd=ZERO)
        assert time.monotonic() - started < 0.5
        assert (refused.value.status, refused.value.retry_after) == (503, 1.0)
        assert refused.value.response_headers()["Retry-After"] == "1"
    # A settle during the outage is dropped: it must not fail the response that is already done.
    await limiter.settle(1, SPEC, Reservation(10, ZERO), actual_tokens=5, actual_cost_usd=ZERO)
    assert errors.count == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    redis_server.start()
    await asyncio.sleep(COOLDOWN_S)
    assert (await limiter.admit(1, SPEC, tokens=10, cost_usd=ZERO)).allowed


@dataclass
class FlakyPrimary:
    """A primary that fails while `down`, and whose calls can be held open to test probing."""

    down: bool = True
    calls: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    seeds: list[PeriodSpend] = field(default_factory=list)

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        self.calls += 1
        await self.gate.wait()
        if self.down:
            raise ConnectionError("refused")
        return Admission(True, None, None, None, None, None)

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("refused")

    async def seed(self, key_id: int, spec: LimitSpec, spend: PeriodSpend) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("refused")
        self.seeds.append(spend)

    async def aclose(self) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_primary_is_skipped_during_the_cooldown_then_probed_by_one_call_at_a_time() -> None:
    primary, clock, errors = FlakyPrimary(), FakeClock(), Errors()
    primary.gate.set()
    limiter = ResilientLimiter(
        primary, MemoryLimiter(), policy="fail_open", expected_instances=1, on_error=errors, clock=clock
    )
    spec = LimitSpec(rpm=1000)
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).requests is not None  # from the fallback
    for _ in range(10):
        await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert (primary.calls, errors.count) == (1, 1)

    clock.now = 1.0  # the default cool-down is over: the next call probes
    primary.gate.clear()
    primary.down = False
    probe = asyncio.create_task(limiter.admit(1, spec, tokens=0, cost_usd=ZERO))
    await asyncio.sleep(0)
    others = [await limiter.admit(1, spec, tokens=0, cost_usd=ZERO) for _ in range(5)]
    assert primary.calls == 2 and all(a.requests is not None for a in others)  # answered locally meanwhile
    primary.gate.set()
    assert (await probe).requests is None  # FlakyPrimary's own answer
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).requests is None
    assert not limiter.degraded and errors.count == 1


async def test_a_settle_goes_to_the_backend_that_admitted_it() -> None:
    primary, fallback = FlakyPrimary(), MemoryLimiter()
    primary.gate.set()
    limiter = ResilientLimiter(primary, fallback, policy="fail_open", expected_instances=1)
    spec = LimitSpec(tpm=1000)
    admitted = await limiter.admit(1, spec, tokens=1000, cost_usd=ZERO)
    assert admitted.reservation is not None and admitted.reservation.via_fallback  # the local bucket answered
    primary.down, calls = False, primary.calls  # the primary is back before the settle
    await limiter.settle(1, spec, admitted.reservation, actual_tokens=400, actual_cost_usd=ZERO)
    assert primary.calls == calls  # never refunded a charge it did not make
    answer = await limiter.admit(1, spec, tokens=600, cost_usd=ZERO)
    assert answer.allowed and answer.tokens is not None and answer.tokens.remaining == 0


async def test_errors_that_are_not_backend_failures_propagate() -> None:
    class Broken(FlakyPrimary):
        async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
            raise ValueError("a bug, not an outage")

    errors = Errors()
    limiter = ResilientLimiter(Broken(), MemoryLimiter(), policy="fail_open", expected_instances=1, on_error=errors)
    with pytest.raises(ValueError, match="a bug"):
        await limiter.admit(1, LimitSpec(), tokens=0, cost_usd=ZERO)
    assert errors.count == 0 and not limiter.degraded


def test_a_fallback_that_is_not_this_instances_share_is_refused() -> None:
    with pytest.raises(ValueError, match="1/expected_instances"):
        ResilientLimiter(FlakyPrimary(), MemoryLimiter(), policy="fail_open", expected_instances=3)
    ResilientLimiter(FlakyPrimary(), MemoryLimiter(scale=1 / 3), policy="fail_open", expected_instances=3)


async def test_fail_closed_serves_every_request_once_redis_answers_again_despite_dead_pooled_connections(
    redis_server: RedisServer,
) -> None:
    # The production client's retry rule, with patient timeouts: on a busy machine a 250 ms timeout is
    # a refusal too, and this test is about connections a restart left dead, not about slowness.
    patient = build_redis(redis_server.url, timeout_s=2.0)
    try:
        await _fail_closed_recovers(redis_server, patient)
    finally:
        await patient.aclose()


async def test_the_same_on_the_limiters_own_script_client(redis_server: RedisServer) -> None:
    """What the lifespan builds for a plain redis:// URL (app/enforcement/redis_wire.py): its connections
    are dropped as Redis closes them, so the restart costs no refusal once Redis answers."""
    patient = build_redis(redis_server.url, timeout_s=2.0)
    scripts = RespScripts(redis_server.url, timeout_s=2.0)
    try:
        await _fail_closed_recovers(redis_server, patient, scripts)
    finally:
        await scripts.aclose()
        await patient.aclose()


async def _fail_closed_recovers(redis_server: RedisServer, client: Redis, scripts: RespScripts | None = None) -> None:
    limiter, _ = resilient(client, "fail_closed", Errors(), scripts)
    spec = LimitSpec(rpm=10**7, burst=10**6)

    async def wave(size: int) -> list[bool]:
        """`size` concurrent admits: True for each one answered, False for each limiter_unavailable."""

        async def one() -> bool:
            try:
                return (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).allowed
            except LimiterUnavailable:
                return False

        return await asyncio.gather(*(one() for _ in range(size)))

    # Concurrent load fills the pool with live connections; a restart of Redis kills them all.
    assert all(await wave(64))
    redis_server.kill()
    assert not any(await wave(16))
    redis_server.start()
    deadline = time.monotonic() + 10
    while not any(await wave(1)):
        assert time.monotonic() < deadline, "the limiter never came back"
        await asyncio.sleep(0.05)
    answers = [answer for _ in range(10) for answer in await wave(64)]
    assert answers.count(False) == 0, f"{answers.count(False)} of {len(answers)} refused after Redis came back"


async def test_the_fallback_seeds_its_share_of_what_is_left_of_a_budget() -> None:
    primary, clock = FlakyPrimary(), FakeClock()
    primary.gate.set()
    limiter = ResilientLimiter(primary, MemoryLimiter(scale=0.5), policy="fail_open", expected_instances=2, clock=clock)
    spec = LimitSpec(budget_usd=Decimal(10))
    asked = await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)  # Redis is down: the fallback has no state
    assert asked.reason == "seed" and asked.period == LIFETIME
    await limiter.seed(1, spec, PeriodSpend(LIFETIME, Decimal(6)))  # 6 of 10 spent, by the audit log
    admitted = await limiter.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    # This instance's share of the 4 USD left, with two instances: 2, of which 1 is now reserved.
    assert admitted.allowed and admitted.budget_remaining_usd == Decimal(1)
    assert admitted.reservation is not None and admitted.reservation.via_fallback
    assert primary.seeds == []


async def test_a_seed_goes_to_redis_while_it_answers_and_fails_closed_without_it() -> None:
    primary = FlakyPrimary(down=False)
    primary.gate.set()
    limiter = ResilientLimiter(primary, MemoryLimiter(), policy="fail_closed", expected_instances=1)
    spend = PeriodSpend(LIFETIME, Decimal(6))
    await limiter.seed(1, LimitSpec(budget_usd=Decimal(10)), spend)
    assert primary.seeds == [spend]
    primary.down = True
    with pytest.raises(LimiterUnavailable):
        await limiter.seed(1, LimitSpec(budget_usd=Decimal(10)), spend)


async def test_each_outage_seeds_the_fallback_afresh() -> None:
    primary, clock = FlakyPrimary(), FakeClock()
    primary.gate.set()
    limiter = ResilientLimiter(primary, MemoryLimiter(), policy="fail_open", expected_instances=1, clock=clock)
    spec = LimitSpec(budget_usd=Decimal(10))
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).reason == "seed"
    await limiter.seed(1, spec, PeriodSpend(LIFETIME, Decimal(2)))
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed
    clock.now, primary.down = 1.0, False
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).requests is None  # Redis answers again
    primary.down = True
    clock.now = 2.0
    # Spend went on in Redis meanwhile: the second outage must read it, not reuse the first one's state.
    assert (await limiter.admit(1, spec, tokens=0, cost_usd=ZERO)).reason == "seed"
