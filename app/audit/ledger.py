"""The spend ledger budgets are seeded from: the audit log's rows, plus this process's rows not yet written."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from app.audit.repository import AuditRepository
from app.db import SessionMaker


class AuditLedger:
    """A SpendLedger (app.enforcement.ledger) over audit_record.

    `pending` (AuditSink.pending_cost) adds the cost of rows this process submitted that are not
    in the database yet; other processes' unwritten rows are not seen.
    """

    def __init__(self, session_maker: SessionMaker, pending: Callable[[int], Decimal] | None = None) -> None:
        self._session_maker = session_maker
        self._pending = pending

    async def spent(self, key_id: int, since: datetime | None) -> Decimal:
        async with self._session_maker() as session:
            spent = await AuditRepository(session).spent_since(key_id, since)
            # In the same turn of the loop as the query's answer (not after the session's close):
            # only a batch the writer commits at that very moment can be missed or counted twice.
            if self._pending is not None:
                spent += self._pending(key_id)
        return spent
