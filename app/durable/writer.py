"""The durable writer: journals each row on submit and writes the rows to the database in batches, in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncEngine

from app.durable.dead_letter import DeadLetters, row_fault
from app.durable.journal import Journal, Line, RowCodec, Segment, encode
from app.durable.kind import RowKind, WriterSettings
from app.durable.metrics import WriterMetrics
from app.durable.storable import Storable
from app.observability import tracing

log = logging.getLogger(__name__)

# How often the writer looks for segments of processes that died while this one runs.
LEFTOVER_SCAN_S = 10.0
# The final fsync at shutdown is not waited for longer than this (a disk that hangs).
FINAL_SYNC_TIMEOUT_S = 5.0

# A row, its journal segment (None: the journal could not take it) and the offset just after it there.
Entry = tuple[dict[str, Any], Segment | None, int]


def default_dead_letter_dir(spool_dir: Path) -> Path:
    return spool_dir.with_name(spool_dir.name + "-dead-letter")


class DurableWriter:
    """Takes rows without waiting; a background writer gets every one into the database.

    submit() makes the row storable, appends it to the journal (one write(2): a process crash keeps
    it) and queues it. The writer inserts batches (by size or interval) with the kind's statement,
    which must make a batch written twice harmless (insert-or-ignore, an upsert by version), fsyncs
    the journal in a thread once per interval, and removes segments once their rows are in. A batch
    the database refuses for a row's content is split until the bad rows are found; they go to the
    dead-letter directory and the others are written. When the database is down the writer keeps the
    rows and retries; when memory is full it stops queueing and reads rows back from the journal in
    order, so nothing overtakes. Rows left on disk by processes that are gone are replayed by start()
    before it returns (bounded), and by the writer after.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: WriterSettings,
        kind: RowKind,
        metrics: WriterMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._kind = kind
        self._metrics = metrics
        self._clock = clock
        self._storable = Storable(kind.table)
        self.journal = Journal(settings.spool_dir, RowCodec.of(kind.table), clock=clock)
        self.dead_letters = DeadLetters(settings.dead_letter_dir or default_dead_letter_dir(settings.spool_dir))
        # For readiness: is the database taking writes; rows dead-lettered by this process, and the last one's story.
        self.database_ok = True
        self.dead_lettered = 0
        self.last_dead_letter: str | None = None
        self._append_error: str | None = None
        self._append_failure = ""  # the last one, for the log line that names the rows it hit
        self._sync_error: str | None = None
        self._queue: deque[Entry] = deque()
        self._behind = False  # memory let go of journaled rows: the writer reads them back from disk
        self._purge = False  # ... and the queue still holds some of those it must drop
        self._in_hand: list[Entry] = []  # the batch being written
        self._unwritten = 0  # rows submitted here and not yet in the database (or dead-lettered)
        self._unjournaled: list[str] = []  # the rows the journal refused (by name), for the next log line
        self._leftovers: list[Path] = []  # segments of earlier processes, to replay oldest first
        self._claimed: Segment | None = None  # the one being replayed
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._next_flush = 0.0
        self._next_sync = 0.0
        self._next_scan = 0.0
        self._insert_statement = kind.insert(engine.dialect.name)

    @property
    def spool_error(self) -> str | None:
        """Why rows cannot be kept on disk at the moment (None: they can)."""
        return self._append_error or self._sync_error

    @property
    def queue_depth(self) -> int:
        """Rows submitted here that are not in the database yet, in memory or only on disk."""
        return self._unwritten

    @property
    def spooled_rows(self) -> int:
        """Of those, the rows memory let go of, to be read back from the journal on disk."""
        return max(0, self._unwritten - len(self._queue) - len(self._in_hand))

    def _pending_add(self, row: dict[str, Any]) -> None:
        """A row of this process's is on its way to the database (for a subclass that keeps sums of them)."""

    def _pending_remove(self, row: dict[str, Any]) -> None:
        """... and is there now, or dead-lettered, or lost."""

    # --- the request path: never waits, never fsyncs -----------------------------------------

    def submit(self, row: dict[str, Any]) -> None:
        row = self._storable(row)
        segment, end = self._journal(row)
        if self._closed:  # after shutdown no writer is left: the next start replays it
            self._after_close(segment)
            return
        self._unwritten += 1
        self._pending_add(row)
        if segment is not None and self._behind:
            self._metrics.rows_spooled.inc()  # the writer reads it back from the journal
            return
        if len(self._queue) >= self._settings.queue_size:
            if segment is None:
                self._lose([(row, None, 0)], "the queue is full and the journal cannot be written")
                return
            self._behind = self._purge = True
            self._metrics.rows_spooled.inc()
            return
        self._queue.append((row, segment, end))
        if len(self._queue) >= self._settings.batch_size:
            self._wake.set()

    def _journal(self, row: dict[str, Any]) -> tuple[Segment | None, int]:
        try:
            placed = self.journal.append(encode(row))
        except (OSError, TypeError) as exc:  # TypeError: a value JSON cannot carry
            self._append_error = self._append_failure = f"{type(exc).__name__}: {exc}"
            self._metrics.spool_errors.inc()
            self._unjournaled.append(self._kind.label(row))
            if self._writer is None:  # no writer to report it soon
                self._report_unjournaled()
            return None, 0
        if self._append_error is not None:
            log.info("%s: the journal at %s takes rows again", self._kind.name, self.journal.directory)
            self._append_error = None
        return placed

    def _after_close(self, segment: Segment | None) -> None:
        if segment is None:
            return  # reported by _journal as lost
        try:
            self.journal.sync_now()
        except OSError as exc:
            log.error("%s: cannot fsync the journal after shutdown (%s)", self._kind.name, exc)

    # --- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the rows earlier processes left in the journal (within a bound), then start the writer."""
        try:
            self._leftovers = self.journal.leftovers()
        except OSError as exc:
            log.error(
                "%s: cannot look for rows left in the journal at %s (%s)", self._kind.name, self.journal.directory, exc
            )
        if self._leftovers:
            count = len(self._leftovers)
            try:
                async with asyncio.timeout(self._settings.startup_replay_timeout_s):
                    while self._leftovers or self._claimed:
                        if not await self._replay_leftover():
                            break
            except TimeoutError:
                pass
            except Exception:  # the server starts anyway; the writer tries again
                log.exception("%s: replaying the journal at start failed", self._kind.name)
            if self._leftovers or self._claimed:
                log.warning(
                    "%s: %d of %d journal segments left by earlier processes wait for the database; the writer"
                    " replays them",
                    self._kind.name,
                    len(self._leftovers) + (self._claimed is not None),
                    count,
                )
            else:
                log.info("%s: replayed %d journal segments left by earlier processes", self._kind.name, count)
        self._writer = asyncio.create_task(self._run(), name=f"{self._kind.name}-writer")

    async def stop(self) -> None:
        """Write this process's rows to the database within the shutdown timeout; what is left stays on disk."""
        self._stopping = True
        self._stop.set()
        self._wake.set()
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
                log.exception("%s: the writer had failed", self._kind.name)
        self._closed = True
        if self._unjournaled:
            self._report_unjournaled()
        # Rows memory holds and the journal does not: one more try, or they are lost (and named).
        for row, segment, _ in [*self._in_hand, *self._queue]:
            if segment is None:
                self._journal(row)
        self._queue.clear()
        self._in_hand = []
        left = len(self._leftovers)
        if self._claimed is not None:
            self.journal.release(self._claimed)  # the next start takes it up again
            self._claimed = None
            left += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_SYNC_TIMEOUT_S):
                await self.journal.synced(self._synced)
        left += self.journal.close()
        if left:
            log.warning(
                "%s: %d journal segments at %s hold rows the database has not taken; the next start replays them",
                self._kind.name,
                left,
                self.journal.directory,
            )

    # --- the writer ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wait()
            try:
                self._housekeeping()
                progressed = await self._step()
            except Exception:  # the writer must outlive any one failure (a journal it cannot read, say)
                log.exception("%s: the writer failed; trying again", self._kind.name)
                progressed = False
            if self._stopping and (not progressed or not (self._queue or self._behind)):
                return  # done, or the database does not answer: the rows are on disk
            if progressed:
                await asyncio.sleep(0)  # whatever the step did, the loop gets a turn
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.retry_interval_s):
                        await self._stop.wait()

    async def _wait(self) -> None:
        """Until a batch is full or the flush interval ends; not at all while rows wait on disk or at shutdown."""
        busy = self._behind or self._leftovers or self._claimed is not None
        if not (self._stopping or busy or len(self._queue) >= self._settings.batch_size):
            delay = self._next_flush - self._clock()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        if self._clock() >= self._next_flush:
            self._next_flush = self._clock() + self._settings.flush_interval_s

    def _housekeeping(self) -> None:
        now = self._clock()
        if self._unjournaled:
            self._report_unjournaled()
        self.journal.maintain(seal_by_age=self.database_ok)
        self._metrics.queue_depth.set(self._unwritten)
        if now >= self._next_sync:
            self._next_sync = now + self._settings.flush_interval_s
            self.journal.sync_soon(self._synced)
        if now >= self._next_scan and not self._stopping:
            self._next_scan = now + LEFTOVER_SCAN_S
            try:
                found = self.journal.leftovers()  # a process sharing the directory died meanwhile
            except OSError as exc:
                log.warning("%s: cannot look for rows left in the journal (%s)", self._kind.name, exc)
                found = []
            self._leftovers += [path for path in found if path not in self._leftovers]

    async def _step(self) -> bool:
        """One batch towards the database; False when the database does not take it."""
        if (self._leftovers or self._claimed is not None) and not self._stopping:
            return await self._replay_leftover()
        if self._behind:
            return await self._catch_up()
        return await self._write_queue()

    async def _write_queue(self) -> bool:
        queue = self._queue
        if not queue:
            return True
        batch = [queue.popleft() for _ in range(min(self._settings.batch_size, len(queue)))]
        self._in_hand = batch  # if shutdown cuts the write off, stop() still sees these
        done = await self._write(batch, own=True, replayed=False)
        self._in_hand = []
        if done == len(batch):
            return True
        rest = batch[done:]
        if self._behind:  # those on disk are read back from there, in order
            rest = [entry for entry in rest if entry[1] is None]
        queue.extendleft(reversed(rest))
        return False

    async def _catch_up(self) -> bool:
        """One batch of this process's rows that only the journal holds now, oldest first."""
        if self._purge:
            self._purge = False
            kept = deque(entry for entry in self._queue if entry[1] is None)
            self._metrics.rows_spooled.inc(len(self._queue) - len(kept))
            self._queue = kept
        segment = self.journal.own_unwritten()
        if segment is None:
            self._behind = False  # memory holds every row from here on
            log.info("%s: the writer caught up with the journal", self._kind.name)
            return await self._write_queue()
        lines = self.journal.read(segment, self._settings.batch_size)
        if not lines:  # cut short under us (by hand?): what it held is gone
            lost = segment.rows - segment.rows_done
            log.error("%s: journal segment %s ends early: %d rows lost", self._kind.name, segment.path, lost)
            self._unwritten -= lost
            segment.committed = segment.written
            return True
        return await self._write_lines(segment, lines, own=True)

    async def _replay_leftover(self) -> bool:
        """One batch of the oldest segment an earlier process left; False when the database does not take it."""
        segment = self._claimed
        if segment is None:
            path = self._leftovers.pop(0)
            try:
                segment = self.journal.open_claimed(path)
            except FileNotFoundError:
                return True  # removed by hand meanwhile: nothing to replay
            self._claimed = segment
            log.info(
                "%s: replaying %s (%d bytes) left by an earlier process", self._kind.name, path.name, segment.written
            )
        lines = self.journal.read(segment, self._settings.batch_size)
        if not lines:
            self.journal.remove(segment)
            self._claimed = None
            return True
        return await self._write_lines(segment, lines, own=False)

    async def _write_lines(self, segment: Segment, lines: list[Line], *, own: bool) -> bool:
        batch: list[Entry] = []
        for line in lines:
            if line.row is not None:
                batch.append((self._storable(line.row), segment, line.end))  # rows of older versions too
                continue
            if batch and await self._write(batch, own=own, replayed=True) < len(batch):
                return False
            batch = []
            if line.raw:
                await self._dead_letter((line.raw, segment, line.end), "unreadable journal line", own=own)
            else:
                segment.committed = line.end  # a torn last line: the crash came before its row was whole
        return not batch or await self._write(batch, own=own, replayed=True) == len(batch)

    async def _write(self, batch: list[Entry], *, own: bool, replayed: bool) -> int:
        """Insert the rows in order; how many of them (a prefix) are done: in the database, or dead-lettered."""
        try:
            await self._insert([entry[0] for entry in batch])
        except Exception as exc:
            reason = row_fault(exc)
            if reason is None:
                self._database_failed(exc)
                return 0
            if len(batch) == 1:
                await self._dead_letter(batch[0], reason, own=own)
                return 1
            # Halves, in order: the rows that are fine are written, and the bad ones found.
            middle = len(batch) // 2
            done = await self._write(batch[:middle], own=own, replayed=replayed)
            if done < middle:
                return done
            return middle + await self._write(batch[middle:], own=own, replayed=replayed)
        if not self.database_ok:
            log.info("%s: the database takes writes again", self._kind.name)
            self.database_ok = True
        self._metrics.rows_written.inc(len(batch))
        if replayed:
            self._metrics.rows_replayed.inc(len(batch))
        self._settle(batch, own=own)
        return len(batch)

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        if tracing.TRACER is not None:
            # A batch serves many requests: a span of its own (a trace root), not a child of any one of them.
            attributes = {
                "db.system.name": self._engine.dialect.name,
                "db.operation.name": "INSERT",
                "db.collection.name": self._kind.table.name,
                "db.operation.batch.size": len(rows),
            }
            await tracing.traced(f"{self._kind.name} batch", self._write_rows(rows), attributes, kind=SpanKind.CLIENT)
        else:
            await self._write_rows(rows)

    async def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        async with asyncio.timeout(self._settings.write_timeout_s), self._engine.begin() as connection:
            await connection.execute(self._insert_statement, rows)
        self._metrics.flush_seconds.observe(time.perf_counter() - started)

    def _database_failed(self, exc: Exception) -> None:
        if self.database_ok:
            # The first line only: SQLAlchemy's next ones list every parameter of the batch (prompts too).
            first = (str(exc).strip().splitlines() or [""])[0][:500]
            log.warning(
                "%s: database write failed (%s: %s); rows wait in the journal at %s until it answers",
                self._kind.name,
                type(exc).__name__,
                first,
                self.journal.directory,
            )
        self.database_ok = False

    async def _dead_letter(
        self, entry: tuple[dict[str, Any] | bytes, Segment | None, int], reason: str, *, own: bool
    ) -> None:
        content, segment, end = entry
        name = self._kind.label(content) if isinstance(content, dict) else None
        try:
            where = str(await asyncio.to_thread(self.dead_letters.write, [(content, reason)]))
        except Exception as exc:  # the log is the only place left for it: all of it
            where = f"nowhere ({type(exc).__name__}: {exc}); the row is {content!r}"
            self._metrics.spool_errors.inc()
        noun = self._kind.noun
        log.error(
            "%s: the database refuses the row of %s %s (%s); dead-lettered to %s",
            self._kind.name,
            noun,
            name,
            reason,
            where,
        )
        self.dead_lettered += 1
        self.last_dead_letter = f"{noun} {name}: {reason}"
        self._metrics.rows_dead_lettered.inc()
        if isinstance(content, dict):
            self._settle([(content, segment, end)], own=own)
        elif segment is not None:
            segment.committed = end
            segment.rows_done += 1
            if own:
                self._unwritten -= 1

    def _settle(self, entries: list[Entry], *, own: bool) -> None:
        """These rows are done with: their journal offsets move past them, and (ours) they are no longer pending."""
        for row, segment, end in entries:
            if segment is not None:
                segment.committed = end
                segment.rows_done += 1
            if own:
                self._pending_remove(row)
        if own:
            self._unwritten -= len(entries)

    def _lose(self, entries: list[Entry], why: str) -> None:
        # Never silent: the rows are named in the log, the only place left to keep them.
        labels = [self._kind.label(entry[0]) for entry in entries]
        log.error("%s: %d rows lost (%s): %s", self._kind.name, len(entries), why, labels)
        self._settle(entries, own=True)

    def _report_unjournaled(self) -> None:
        ids, self._unjournaled = self._unjournaled, []
        if self._closed:
            log.error(
                "%s: cannot write the journal after shutdown (%s); rows lost: %s",
                self._kind.name,
                self._append_failure,
                ids,
            )
        else:
            log.error(
                "%s: cannot write the journal at %s (%s); %d rows are kept in memory only until the database"
                " takes them: %s",
                self._kind.name,
                self.journal.directory,
                self._append_failure,
                len(ids),
                ids,
            )

    def _synced(self, failure: BaseException | None) -> None:
        if failure is None:
            self._sync_error = None
            return
        if self._sync_error is None:
            log.error("%s: cannot fsync the journal at %s (%s)", self._kind.name, self.journal.directory, failure)
        self._sync_error = f"fsync: {type(failure).__name__}: {failure}"
        self._metrics.spool_errors.inc()
