"""Budgets seeded from the spend ledger: one read per key at a time, bounded, and an exact sum of the audit log."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from app.audit.ledger import AuditLedger
from app.audit.models import AuditRecord
from app.auth.principal import KeyLimits, Principal
from app.config import DatabaseSettings, LimitSettings
from app.db import create_engine, create_session_maker
from app.enforcement.breaker import BreakerConfig, BreakerRegistry
from app.enforcement.concurrency import ConcurrencyLimiter
from app.enforcement.enforcer import Enforcer
from app.enforcement.ledger import SpendLedger
from app.enforcement.memory_limiter import MemoryLimiter
from app.enforcement.retry import RetryPolicy
from app.errors import BudgetExceeded, BudgetUnavailable
from app.observability.metrics import Metrics
from app.providers.base import Provider, Usage
from app.providers.registry import ModelRoute
from tests.support import fresh_postgres_database

# One USD per million tokens either way: a call of 100 + 900 tokens reserves 0.001 USD.
ROUTE = ModelRoute("priced", cast(Provider, object()), "priced", Decimal(1), Decimal(1))
PROMPT, MAX_TOKENS = 100, 900
RESERVED = Decimal("0.001")


@dataclass
class Ledger:
    """A SpendLedger that records its reads and answers when `gate` opens (or fails with `error`)."""

    spent_by_key: dict[int, Decimal] = field(default_factory=dict)
    reads: list[tuple[int, datetime | None]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def spent(self, key_id: int, since: datetime | None) -> Decimal:
        self.reads.append((key_id, since))
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.spent_by_key.get(key_id, Decimal(0))


def enforcer(ledger: SpendLedger | None, limiter: MemoryLimiter | None = None) -> Enforcer:
    return Enforcer(
        LimitSettings(),
        MemoryLimiter() if limiter is None else limiter,  # an empty MemoryLimiter is falsy (it has a len)
        ConcurrencyLimiter(1000),
        BreakerRegistry(BreakerConfig()),
        RetryPolicy(),
        Metrics(),
        ledger=ledger,
    )


def principal(key_id: int, budget: str | None = "1", period: str | None = None) -> Principal:
    limits = KeyLimits(
        rpm=10**7,
        tpm=10**9,
        max_concurrency=1000,
        budget_usd=None if budget is None else Decimal(budget),
        budget_period=period,
    )
    return Principal(key_id, "k", "pk_k", limits=limits)


async def admit(chain: Enforcer, who: Principal) -> None:
    """A request admitted and closed without calling its model: its reservation is refunded."""
    ticket = await chain.admit(who, route=ROUTE, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS)
    await ticket.close()


async def spend(chain: Enforcer, who: Principal) -> None:
    """A request whose model call used all it reserved: 0.001 USD spent."""
    ticket = await chain.admit(who, route=ROUTE, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS)
    reservation = await ticket.reserve(ROUTE, PROMPT, MAX_TOKENS)
    await ticket.settle(reservation, Usage(PROMPT, MAX_TOKENS), RESERVED)
    await ticket.close()


async def test_concurrent_requests_of_one_key_share_one_ledger_read_and_later_ones_none() -> None:
    ledger = Ledger({1: Decimal("0.9")})
    ledger.gate.clear()
    chain = enforcer(ledger)
    who = principal(1)
    tickets = [asyncio.create_task(chain.admit(who, route=ROUTE, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS))]
    tickets += [
        asyncio.create_task(chain.admit(who, route=ROUTE, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS))
        for _ in range(149)
    ]
    await asyncio.sleep(0.01)
    ledger.gate.set()
    answers = await asyncio.gather(*tickets, return_exceptions=True)
    # 0.9 of 1 USD spent: exactly 100 reservations of 0.001 fit, and the record was read once.
    assert sum(not isinstance(a, BaseException) for a in answers) == 100
    assert {type(a) for a in answers if isinstance(a, BaseException)} == {BudgetExceeded}
    assert ledger.reads == [(1, None)]
    for ticket in answers:
        if not isinstance(ticket, BaseException):
            await ticket.close()  # each refunds its unused reservation
    for _ in range(50):
        await admit(chain, who)
    assert len(ledger.reads) == 1  # a key with budget state never pays for a read again


async def test_a_ledger_that_does_not_answer_refuses_budgeted_keys_with_a_retryable_503_after_2_s() -> None:
    ledger = Ledger()
    ledger.gate.clear()  # never answers
    chain = enforcer(ledger)
    waiting = asyncio.create_task(admit(chain, principal(1)))
    await asyncio.sleep(0.05)
    # Meanwhile a key without a budget is served at once, and never causes a read.
    started = time.monotonic()
    await admit(chain, principal(2, budget=None))
    assert time.monotonic() - started < 0.5
    with pytest.raises(BudgetUnavailable) as refused:
        await waiting
    assert 1.9 <= time.monotonic() - started + 0.05 < 3.0
    error = refused.value
    assert (error.status, error.code, error.retryable) == (503, "budget_unavailable", True)
    assert error.response_headers()["Retry-After"] == "1"
    assert ledger.reads == [(1, None)]


async def test_a_failed_read_is_not_remembered_the_next_request_reads_again() -> None:
    ledger = Ledger({1: Decimal("0.5")}, error=OSError("database down"))
    chain = enforcer(ledger)
    with pytest.raises(BudgetUnavailable):
        await admit(chain, principal(1))
    ledger.error = None
    await admit(chain, principal(1))
    assert len(ledger.reads) == 2


async def test_a_day_budget_reads_what_was_spent_since_midnight_utc() -> None:
    ledger = Ledger()
    chain = enforcer(ledger)
    before = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await admit(chain, principal(1, period="day"))
    await admit(chain, principal(2, period="month"))
    after = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert ledger.reads[0] in ((1, before), (1, after))
    assert ledger.reads[1] in ((2, before.replace(day=1)), (2, after.replace(day=1)))


async def test_a_later_model_call_of_a_task_seeds_a_budget_lost_meanwhile() -> None:
    ledger = Ledger({1: Decimal("0.9975")})
    limiter = MemoryLimiter()
    chain = enforcer(ledger, limiter)
    ticket = await chain.admit(principal(1), route=ROUTE, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS)
    first = await ticket.reserve(ROUTE, PROMPT, MAX_TOKENS)  # the admission's, pre-paid
    await ticket.settle(first, Usage(100, 200), ROUTE.cost(Usage(100, 200)))  # 0.9978 spent
    assert (await ticket.reserve(ROUTE, PROMPT, MAX_TOKENS)).cost_usd == RESERVED  # 0.9988 of 1: fits
    limiter.forget()  # lost, as by an eviction; other instances spent meanwhile, the record says
    ledger.spent_by_key[1] = Decimal("0.9995")
    with pytest.raises(BudgetExceeded):
        await ticket.reserve(ROUTE, PROMPT, MAX_TOKENS)  # 0.9995 + 0.001 is over 1 USD
    await ticket.close()
    assert len(ledger.reads) == 2


async def test_without_a_ledger_a_budget_lives_in_the_limiter_alone_from_zero() -> None:
    chain = enforcer(None)
    for _ in range(1000):
        await spend(chain, principal(1))  # 1000 x 0.001 USD: all of the budget
    with pytest.raises(BudgetExceeded):
        await admit(chain, principal(1))


# The audit ledger against real databases: an exact sum over the (api_key_id, created_at) range.


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
        return
    with fresh_postgres_database("ledger") as url:
        yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(DatabaseSettings(url=database_url))
    async with engine.begin() as connection:
        await connection.run_sync(SQLModel.metadata.create_all)
    yield engine
    await engine.dispose()


async def add_rows(engine: AsyncEngine, key_id: int | None, created_at: datetime, costs: list[Decimal]) -> None:
    rows = [
        {
            "record_uid": secrets.token_hex(16),
            "request_id": "r",
            "created_at": created_at,
            "finished_at": created_at,
            "api_key_id": key_id,
            "route": "/v1/tasks",
            "transport": "json",
            "status": "completed",
            "cost_usd": cost,
        }
        for cost in costs
    ]
    async with engine.begin() as connection:
        await connection.execute(insert(AuditRecord.__table__), rows)  # type: ignore[attr-defined]


async def test_the_audit_ledger_sums_a_keys_spend_since_a_moment_exactly(engine: AsyncEngine) -> None:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    # Sums a float would get wrong (0.1 + 0.2), and the smallest amount a row holds.
    await add_rows(engine, 7, midnight, [Decimal("0.1"), Decimal("0.2"), Decimal("0.000000001")] * 400)
    await add_rows(engine, 7, midnight - timedelta(microseconds=1), [Decimal(5)])  # yesterday's last moment
    await add_rows(engine, 8, midnight, [Decimal(3)])  # another key
    await add_rows(engine, None, midnight, [Decimal(3)])  # a request refused before its key was known
    ledger = AuditLedger(create_session_maker(engine), pending=lambda key: Decimal("0.25") if key == 7 else Decimal(0))
    assert await ledger.spent(7, midnight) == Decimal("120.000000400") + Decimal("0.25")
    assert await ledger.spent(7, None) == Decimal("125.000000400") + Decimal("0.25")
    assert await AuditLedger(create_session_maker(engine)).spent(9, None) == 0
