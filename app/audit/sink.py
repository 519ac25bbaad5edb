"""The audit sink: takes a row per request without waiting, and writes them in batches in the background.

Rows go from a bounded queue to the database in batches (by size or interval) with
insert-or-ignore on each row's server-made record_uid, so a batch written twice never duplicates. When the database is
unreachable, or the queue is full, rows go to the spool and are replayed in order once the
database answers; while the spool holds rows, new batches queue up behind them there, so the
table fills in the order requests finished. Shutdown flushes what it can and spools the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.models import AuditRecord
from app.audit.spool import Spool
from app.config import AuditSettings
from app.observability.metrics import Metrics

log = logging.getLogger(__name__)

_TABLE = AuditRecord.__table__  # type: ignore[attr-defined]


class AuditSink:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: AuditSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=settings.queue_size)
        self.spool = Spool(settings.spool_dir)
        self.database_ok = True
        self.spool_error: str | None = None
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_hand: list[dict[str, Any]] = []  # the batch being written, spooled if shutdown cuts it off
        self._insert = _insert_statement(engine)

    # The request path: never waits.
    def submit(self, row: dict[str, Any]) -> None:
        if self._stopping or self._writer is None:
            self._spool_now([row])  # after shutdown began (or before start), straight to disk
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self._spool_now([row])

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Write what is queued (or spool it) within the shutdown timeout; report anything left."""
        self._stopping = True
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                async with asyncio.timeout(self._settings.shutdown_timeout_s):
                    await asyncio.shield(writer)
            except TimeoutError:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            except Exception:
                log.exception("audit: the writer had failed; spooling what it left")
        # Whatever the writer had in hand or could not reach: to disk (insert-or-ignore makes a
        # row that did reach the database harmless to replay).
        self._spool_now(self._in_hand + _drain(self._queue))
        self._in_hand = []
        if self.spool.has_rows():
            log.warning(
                "audit: rows remain in the spool at %s; they are replayed at the next start", self.spool.directory
            )

    async def _run(self) -> None:
        next_replay = 0.0  # a previous run may have left rows in the spool: they go first
        while not (self._stopping and self._queue.empty()):
            batch = await self._next_batch()
            try:
                if self.spool.has_rows() and self._clock() >= next_replay and not self._stopping:
                    replayed = await self._replay()
                    next_replay = 0.0 if replayed else self._clock() + self._settings.retry_interval_s
                if batch and (self.spool.has_rows() or not await self._insert_rows(batch)):
                    self._spool_now(batch)
            except Exception:
                # The writer must outlive any one failure (a spool file gone, say): keep the batch.
                log.exception("audit: writing a batch failed; spooling it")
                self._spool_now(batch)
                next_replay = self._clock() + self._settings.retry_interval_s
            self._in_hand = []

    async def _next_batch(self) -> list[dict[str, Any]]:
        """Up to batch_size rows, waiting at most flush_interval_s after the first (or for one)."""
        settings = self._settings
        batch: list[dict[str, Any]] = []
        self._in_hand = batch  # filled in place, so that a cancelled wait loses nothing
        try:
            async with asyncio.timeout(settings.flush_interval_s):
                batch.append(await self._queue.get())
                while len(batch) < settings.batch_size:
                    batch.append(await self._queue.get())
        except TimeoutError:
            pass
        while len(batch) < settings.batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._metrics.audit_queue_depth.set(self._queue.qsize())
        return batch

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._settings.write_timeout_s):
                async with self._engine.begin() as connection:
                    await connection.execute(self._insert, rows)
        except Exception as exc:  # any failure to write: the rows must go to the spool
            if self.database_ok:
                log.warning(
                    "audit: database write failed (%s: %s); spooling to %s",
                    type(exc).__name__,
                    exc,
                    self.spool.directory,
                )
            self.database_ok = False
            return False
        if not self.database_ok:
            log.info("audit: the database takes writes again")
        self.database_ok = True
        self._metrics.audit_flush_seconds.observe(time.perf_counter() - started)
        self._metrics.audit_rows_written.inc(len(rows))
        return True

    async def _replay(self) -> bool:
        """Move the spool into the database, oldest first; False when the database refuses."""
        self.spool.seal()
        for segment in self.spool.segments():
            for batch in self.spool.read(segment, self._settings.batch_size):
                if not await self._insert_rows(batch):
                    return False
                self._metrics.audit_rows_replayed.inc(len(batch))
            # A segment is removed only once every row of it is in (duplicates are ignored there).
            self.spool.remove(segment)
        return True

    def _spool_now(self, rows: list[dict[str, Any]]) -> None:
        try:
            self.spool.append(rows)
        except OSError as exc:
            self.spool_error = f"{type(exc).__name__}: {exc}"
            self._metrics.audit_spool_errors.inc()
            # Never silent: the rows are named in the log, the only place left to keep them.
            log.error(
                "audit: cannot write the spool (%s); %d rows lost: %s",
                self.spool_error,
                len(rows),
                [row.get("request_id") for row in rows],
            )
            return
        self.spool_error = None
        self._metrics.audit_rows_spooled.inc(len(rows))


def _drain(queue: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    while not queue.empty():
        rows.append(queue.get_nowait())
    return rows


def _insert_statement(engine: AsyncEngine) -> Any:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(_TABLE).on_conflict_do_nothing(index_elements=["record_uid"])
