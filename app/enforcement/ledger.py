"""Budget seeding: a limiter's missing budget state is started from the spend ledger, one read per key at a time."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Protocol

from app.enforcement.limits import Limiter, LimitSpec, Period, PeriodSpend
from app.errors import BudgetUnavailable

log = logging.getLogger(__name__)

SEED_TIMEOUT_S = 2.0
RETRY_AFTER_S = 1.0


class SpendLedger(Protocol):
    """The durable record of what each key spent."""

    async def spent(self, key_id: int, since: datetime | None) -> Decimal:
        """What the key spent at or after `since` (None: ever)."""
        ...


class _LedgerFailed(Exception):
    """The ledger did not answer in time: every request waiting on that read is refused."""


class BudgetSeeder:
    """Seeds `limiter` from `ledger` for a key whose budget state it lacks.

    Concurrent requests of one key share one ledger read (per period), bounded by `timeout_s`.
    Without a ledger (audit disabled) a budget lives in the limiter alone and starts from zero.
    """

    def __init__(self, limiter: Limiter, ledger: SpendLedger | None, *, timeout_s: float = SEED_TIMEOUT_S) -> None:
        self._limiter = limiter
        self._ledger = ledger
        self._timeout_s = timeout_s
        self._reads: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._failing = False

    async def seed(self, key_id: int, spec: LimitSpec, period: Period) -> None:
        """Seed the key's state for `period`; BudgetUnavailable when the ledger cannot say what was spent."""
        if self._ledger is None:
            await self._limiter.seed(key_id, spec, PeriodSpend(period, Decimal(0)))
            return
        flight = (key_id, period.id)
        read = self._reads.get(flight)
        if read is None:
            read = self._reads[flight] = asyncio.create_task(self._read_and_seed(self._ledger, key_id, spec, period))
            read.add_done_callback(partial(self._landed, flight))
        try:
            # Shielded: a caller that goes away must not cancel the read the others wait for.
            await asyncio.shield(read)
        except _LedgerFailed:
            raise BudgetUnavailable(
                "The key's spend cannot be read right now; try again shortly.", retry_after=RETRY_AFTER_S
            ) from None

    async def _read_and_seed(self, ledger: SpendLedger, key_id: int, spec: LimitSpec, period: Period) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                spent = await ledger.spent(key_id, period.start)
        except Exception as exc:  # whatever the ledger's failure (timeout, database down), the budget is unknown
            if not self._failing:
                self._failing = True
                log.warning("budgets cannot be seeded: the spend ledger failed (%s: %s)", type(exc).__name__, exc)
            raise _LedgerFailed from exc
        if self._failing:
            self._failing = False
            log.info("the spend ledger answers again")
        await self._limiter.seed(key_id, spec, PeriodSpend(period, spent))

    def _landed(self, flight: tuple[int, str], read: asyncio.Task[None]) -> None:
        del self._reads[flight]
        if not read.cancelled():
            read.exception()  # retrieved here, so that a read nobody awaits any more is not reported as lost
