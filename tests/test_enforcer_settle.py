"""Settlements off the request's way (a shared limiter): none is lost, a failure is logged, shutdown waits.

On Redis limits (app/lifespan.py: build_enforcer) the enforcer settles a reservation in a task of its
own, so that the answer does not wait for that round trip; these run it on a limiter whose settle
waits until the test lets it go, as a slow Redis would.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import cast

import pytest

from app.auth.principal import KeyLimits, Principal
from app.config import LimitSettings
from app.enforcement.breaker import BreakerConfig, BreakerRegistry
from app.enforcement.concurrency import ConcurrencyLimiter
from app.enforcement.enforcer import Enforcer
from app.enforcement.limits import LimitSpec, Reservation
from app.enforcement.memory_limiter import MemoryLimiter
from app.enforcement.retry import RetryPolicy
from app.observability.metrics import Metrics
from app.providers.base import Provider, Usage
from app.providers.registry import ModelRoute

ROUTE = ModelRoute("priced", cast(Provider, object()), "priced", Decimal(1), Decimal(1))
KEY = Principal(7, "settle", "pk_settle", KeyLimits(tpm=10_000, budget_usd=Decimal(1)))


class HeldLimiter(MemoryLimiter):
    """A MemoryLimiter whose settle waits for `gate` (and then fails with `error`, if set)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.error: Exception | None = None
        self.settled: list[int] = []

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        await super().settle(key_id, spec, reservation, actual_tokens=actual_tokens, actual_cost_usd=actual_cost_usd)
        self.settled.append(actual_tokens)


def enforcer(limiter: MemoryLimiter, *, background: bool) -> Enforcer:
    return Enforcer(
        LimitSettings(),
        limiter,
        ConcurrencyLimiter(100),
        BreakerRegistry(BreakerConfig()),
        RetryPolicy(),
        Metrics(),
        settle_in_background=background,
    )


async def one_request(chain: Enforcer) -> None:
    ticket = await chain.admit(KEY, route=ROUTE, prompt_tokens=100, max_tokens=900)
    reservation = await ticket.reserve(ROUTE, 100, 900)
    await ticket.settle(reservation, Usage(100, 50), ROUTE.cost(Usage(100, 50)))
    await ticket.close()


async def test_the_request_does_not_wait_for_its_settlement_and_shutdown_waits_for_every_one() -> None:
    limiter = HeldLimiter()
    chain = enforcer(limiter, background=True)
    # Returns although no settlement can finish yet; the slot is free at once.
    await asyncio.wait_for(asyncio.gather(*(one_request(chain) for _ in range(3))), timeout=5)
    assert chain.concurrency.in_flight == 0
    assert limiter.settled == []
    waiting = asyncio.ensure_future(chain.settled())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # shutdown waits for the settlements in flight
    limiter.gate.set()
    await asyncio.wait_for(waiting, timeout=5)
    assert limiter.settled == [150, 150, 150]  # each one with the usage really spent
    # And the tokens not spent are back: a request the estimate alone would not fit is admitted.
    admission = await limiter.admit(KEY.key_id, chain.spec_for(KEY), tokens=10_000 - 3 * 150, cost_usd=Decimal(0))
    assert admission.allowed


async def test_a_settlement_that_fails_in_the_background_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    limiter = HeldLimiter()
    limiter.error = RuntimeError("a bug in the limiter")
    limiter.gate.set()
    chain = enforcer(limiter, background=True)
    with caplog.at_level(logging.ERROR, logger="app.enforcement.enforcer"):
        await one_request(chain)
        await chain.settled()
    assert any("settlement failed" in record.getMessage() and record.exc_info for record in caplog.records)


async def test_without_a_shared_limiter_the_settlement_is_awaited_in_place() -> None:
    limiter = HeldLimiter()
    chain = enforcer(limiter, background=False)
    request = asyncio.ensure_future(one_request(chain))
    await asyncio.sleep(0.01)
    assert not request.done()  # waits for the limiter, as the in-process default always did
    limiter.gate.set()
    await asyncio.wait_for(request, timeout=5)
    assert limiter.settled == [150]
