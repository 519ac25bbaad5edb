"""The audit sink: a durable writer (app/durable/) of audit_record rows, keeping the cost of those not yet written."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable

from app.audit.models import AuditRecord
from app.config import AuditSettings
from app.db import insert_on_conflict
from app.durable.kind import RowKind
from app.durable.metrics import WriterMetrics
from app.durable.writer import DurableWriter
from app.observability.metrics import Metrics

_TABLE = AuditRecord.__table__  # type: ignore[attr-defined]
_ZERO = Decimal(0)


def _insert(dialect: str) -> Executable:
    # Insert-or-ignore on the server-made record_uid: a batch written twice never duplicates.
    return insert_on_conflict(_TABLE, dialect).on_conflict_do_nothing(index_elements=["record_uid"])


AUDIT_ROWS = RowKind(name="audit", table=_TABLE, insert=_insert, noun="request", id_field="request_id")


class AuditSink(DurableWriter):
    """Takes a row per request without waiting; a background writer gets every one into the database.

    Everything but the cost is DurableWriter's (journal on submit, batches, dead letters, replay at
    start). pending_cost() is what budget seeds add to the log's sums: the rows of this process
    that are not in the database yet.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: AuditSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        writer_metrics = WriterMetrics(
            queue_depth=metrics.audit_queue_depth,
            flush_seconds=metrics.audit_flush_seconds,
            rows_written=metrics.audit_rows_written,
            rows_spooled=metrics.audit_rows_spooled,
            rows_replayed=metrics.audit_rows_replayed,
            spool_errors=metrics.audit_spool_errors,
            rows_dead_lettered=metrics.audit_rows_dead_lettered,
        )
        super().__init__(engine, settings, AUDIT_ROWS, writer_metrics, clock=clock)
        self._pending: dict[int, Decimal] = {}  # the cost of rows submitted here and not yet committed, per key
        # The live activity feed's counters (app/observability/activity.py): one row is one request.
        self.observe: Callable[[dict[str, Any]], None] | None = None

    def submit(self, row: dict[str, Any]) -> None:
        if self.observe is not None:
            self.observe(row)
        super().submit(row)

    def pending_cost(self, key_id: int) -> Decimal:
        """The summed cost_usd of this key's rows submitted here and not yet committed to the database."""
        return self._pending.get(key_id, _ZERO)

    def _pending_add(self, row: dict[str, Any]) -> None:
        key, cost = row.get("api_key_id"), row.get("cost_usd")
        if key is not None and isinstance(cost, Decimal) and cost:
            self._pending[key] = self._pending.get(key, _ZERO) + cost

    def _pending_remove(self, row: dict[str, Any]) -> None:
        key, cost = row.get("api_key_id"), row.get("cost_usd")
        if key is not None and isinstance(cost, Decimal) and cost:
            left = self._pending.get(key, _ZERO) - cost
            if left:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
