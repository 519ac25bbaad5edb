"""The task records: written off the hot path by a durable writer, read with a bound, and the SQL of the task table."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, not_, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from app.config import TaskSettings
from app.db import insert_on_conflict
from app.durable.kind import RowKind
from app.durable.storable import Storable
from app.durable.writer import DurableWriter
from app.errors import AppError, InvalidRequest
from app.observability.metrics import Metrics
from app.tasks.models import ACTIVE_STATUSES, FINAL_VERSION, TASK_COLUMNS, Task, TaskRecord, TaskStatus

T = TypeVar("T")

_TABLE = Task.__table__  # type: ignore[attr-defined]
_C = _TABLE.c
# A record's identity never changes: a later version replaces everything else.
_IMMUTABLE = ("id", "api_key_id", "created_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MICROS = (datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_CURSOR_ID = re.compile(r"[\x21-\x7e]{1,64}")  # printable ASCII, as task ids are


@functools.cache
def _upsert(dialect: str) -> Executable:
    """Insert, or replace a record the table holds at a lower version: a replayed admission never undoes an end."""
    statement = insert_on_conflict(_TABLE, dialect)
    return statement.on_conflict_do_update(
        index_elements=["id"],
        set_={name: statement.excluded[name] for name in TASK_COLUMNS if name not in _IMMUTABLE},
        where=_C.version < statement.excluded.version,
    )


TASK_ROWS = RowKind(name="tasks", table=_TABLE, insert=_upsert, noun="task", id_field="id")


class TaskStoreUnavailable(AppError):
    """The database did not answer a task read (or direct write) in time, or failed: worth a retry."""

    status, code, title, retryable = 503, "task_store_unavailable", "Task records cannot be read right now", True


@dataclass(frozen=True, slots=True)
class TaskFilters:
    """Every field narrows the records; None leaves that column unfiltered. since <= created_at < until."""

    api_key_id: int | None = None  # None: every key's (admins)
    status: TaskStatus | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskPage:
    records: list[TaskRecord]  # newest first
    next_cursor: str | None  # None: the last page


class TaskRepository:
    """The SQL of the task table. Callers own the connection and its transaction; timestamps are passed in UTC."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def upsert(self, rows: list[dict[str, Any]]) -> None:
        await self.connection.execute(_upsert(self.connection.dialect.name), rows)

    async def get(self, task_id: str) -> TaskRecord | None:
        row = (await self.connection.execute(select(_TABLE).where(_C.id == task_id))).mappings().first()
        return None if row is None else TaskRecord.from_row(row)

    async def page(
        self, filters: TaskFilters, after: tuple[datetime, str] | None, limit: int
    ) -> tuple[list[TaskRecord], tuple[datetime, str] | None]:
        """Up to `limit` records before `after` in (created_at, id) order, newest first, and the next page's key.

        A record's created_at and id never change, so every record that existed when paging began
        is returned exactly once, however many arrive meanwhile.
        """
        query = select(_TABLE)
        if filters.api_key_id is not None:
            query = query.where(_C.api_key_id == filters.api_key_id)
        if filters.status is not None:
            query = query.where(_C.status == filters.status)
        if filters.since is not None:
            query = query.where(_C.created_at >= as_utc(filters.since))
        if filters.until is not None:
            query = query.where(_C.created_at < as_utc(filters.until))
        if after is not None:
            at, task_id = as_utc(after[0]), after[1]
            query = query.where(or_(_C.created_at < at, and_(_C.created_at == at, _C.id < task_id)))
        # One record beyond the page tells whether another page exists, without a count.
        query = query.order_by(_C.created_at.desc(), _C.id.desc()).limit(limit + 1)
        records = [TaskRecord.from_row(row) for row in (await self.connection.execute(query)).mappings()]
        if len(records) <= limit:
            return records, None
        records = records[:limit]
        return records, (records[-1].created_at, records[-1].id)

    async def count_active_background(self, api_key_id: int) -> int:
        query = select(func.count()).where(_C.api_key_id == api_key_id, _C.background, _C.status.in_(ACTIVE_STATUSES))
        return int((await self.connection.execute(query)).scalar_one())

    async def renew_leases(self, task_ids: Collection[str], until: datetime) -> set[str]:
        """Extend the leases of those still queued or running; their ids (one claimed meanwhile is not among them)."""
        if not task_ids:
            return set()
        statement = (
            update(_TABLE)
            .where(_C.id.in_(list(task_ids)), _C.status.in_(ACTIVE_STATUSES))
            .values(lease_expires_at=as_utc(until))
            .returning(_C.id)
        )
        return set((await self.connection.execute(statement)).scalars())

    async def claim_expired(self, cutoff: datetime, now: datetime, limit: int) -> list[TaskRecord]:
        """Fail (worker_lost, final version) up to `limit` queued or running tasks whose lease ended before `cutoff`.

        One UPDATE whose WHERE holds the whole condition, so a row another sweeper changed first is
        passed over. On PostgreSQL the candidates are locked FOR UPDATE SKIP LOCKED in a CTE (once:
        a subquery under IN may be run again for each row, and take more than `limit`), so that
        concurrent sweepers take different rows; SQLite's writers take turns.
        """
        expired = and_(_C.status.in_(ACTIVE_STATUSES), _C.lease_expires_at < as_utc(cutoff))
        candidates = select(_C.id).where(expired).order_by(_C.lease_expires_at).limit(limit)
        statement = update(_TABLE).where(expired)
        if self.connection.dialect.name == "postgresql":
            locked = candidates.with_for_update(skip_locked=True).cte("expired").prefix_with("MATERIALIZED")
            statement = statement.where(_C.id == locked.c.id)
        else:
            statement = statement.where(_C.id.in_(candidates.scalar_subquery()))
        statement = statement.values(
            status="failed",
            error_code="worker_lost",
            error_detail="The instance running this task stopped renewing its lease.",
            finished_at=as_utc(now),
            lease_expires_at=None,
            version=FINAL_VERSION,
        ).returning(*_C)
        return [TaskRecord.from_row(row) for row in (await self.connection.execute(statement)).mappings()]

    async def delete_before(self, cutoff: datetime, batch_size: int) -> int:
        """Delete one batch of records created before `cutoff`, never an active background task; how many."""
        keep = and_(_C.background, _C.status.in_(ACTIVE_STATUSES))
        oldest = select(_C.id).where(_C.created_at < as_utc(cutoff), not_(keep)).limit(batch_size)
        result = await self.connection.execute(delete(_TABLE).where(_C.id.in_(oldest.scalar_subquery())))
        return int(result.rowcount or 0)


async def prune_tasks(engine: AsyncEngine, cutoff: datetime, batch_size: int) -> int:
    """Delete the records created before `cutoff` in transactions of `batch_size`, so the table is never locked long."""
    deleted = 0
    while True:
        async with engine.begin() as connection:
            batch = await TaskRepository(connection).delete_before(cutoff, batch_size)
        deleted += batch
        if batch < batch_size:
            return deleted


class TaskStore:
    """Every task's record: written through a durable writer (journal, batches, replay at start), read with a bound.

    A record goes in at admission (version 1) and at the end (version 2); the upsert applies only a
    higher version than the table holds, so replays and retries never undo an end. Reads answer
    within `tasks.read_timeout_s` or raise TaskStoreUnavailable; the request path never waits
    longer on a database that does not answer. Reads see committed records: this process's newest
    ones reach the table within `tasks.flush_interval_s` while the database takes writes.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: TaskSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._settings = settings
        # For readiness and metrics: database_ok, spool_error, dead_lettered, last_dead_letter, queue_depth.
        self.writer = DurableWriter(engine, settings, TASK_ROWS, metrics.task_records, clock=clock)
        self._storable = Storable(_TABLE)
        self._abandoned: set[asyncio.Task[Any]] = set()  # calls given up on, left to end in the background

    async def start(self) -> None:
        """Write the records earlier processes left in the journal (within a bound), then start the writer."""
        await self.writer.start()

    async def stop(self) -> None:
        """Write this process's records within the shutdown timeout; what is left stays on disk for the next start."""
        await self.writer.stop()
        if self._abandoned:
            await asyncio.wait(self._abandoned, timeout=1.0)

    # --- writes -------------------------------------------------------------------------------

    def submit(self, record: TaskRecord | Mapping[str, Any]) -> None:
        """Journal the record and queue it for the writer; never waits. Raises ValueError for a malformed record."""
        self.writer.submit(_row(record))

    async def write_now(self, record: TaskRecord | Mapping[str, Any], timeout_s: float | None = None) -> bool:
        """Write the record before returning, so every instance sees it at once: True.

        When the database does not take it within `timeout_s` (default tasks.read_timeout_s), the
        record is submitted instead (journaled, written when the database answers): False.
        """
        row = self._storable(_row(record))
        try:
            await self._call(lambda tasks: tasks.upsert([row]), timeout_s)
        except Exception:  # whatever the database's trouble, the writer keeps the record from here
            self.writer.submit(row)
            return False
        return True

    # --- reads and sweeps ---------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._call(lambda tasks: tasks.get(task_id))

    async def page(self, filters: TaskFilters, cursor: str | None, limit: int) -> TaskPage:
        """Up to `limit` records, newest first; `cursor` is a previous page's next_cursor (else InvalidRequest)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = decode_cursor(cursor) if cursor is not None else None
        records, last = await self._call(lambda tasks: tasks.page(filters, after, limit))
        return TaskPage(records, encode_cursor(*last) if last is not None else None)

    async def count_active_background(self, api_key_id: int) -> int:
        """The key's background tasks queued or running, as committed."""
        return await self._call(lambda tasks: tasks.count_active_background(api_key_id))

    async def renew_leases(self, task_ids: Collection[str], until: datetime) -> set[str]:
        """Extend the leases of these tasks to `until`; the ids renewed (one missing was claimed or has ended)."""
        return await self._call(lambda tasks: tasks.renew_leases(task_ids, until))

    async def claim_expired(self, now: datetime, grace: timedelta, *, limit: int = 500) -> list[TaskRecord]:
        """Fail, as worker_lost, the tasks whose lease ended before now - grace; each one claimed once."""
        return await self._call(lambda tasks: tasks.claim_expired(now - grace, now, limit))

    async def prune(self, older_than: datetime, batch_size: int = 1_000) -> int:
        """Delete records created before `older_than` (never an active background task), a batch per transaction."""
        deleted = 0
        while True:
            batch = await self._call(lambda tasks: tasks.delete_before(older_than, batch_size))
            deleted += batch
            if batch < batch_size:
                return deleted

    async def _call(self, work: Callable[[TaskRepository], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run `work` in a transaction of its own, answering within the timeout whatever the database does."""
        timeout = self._settings.read_timeout_s if timeout_s is None else timeout_s

        async def transaction() -> T:
            async with self._engine.begin() as connection:
                return await work(TaskRepository(connection))

        # A task of its own, waited for through a shield: on timeout it is cancelled and left to end
        # on its own, since a frozen server can hold even the cancellation's cleanup.
        call = asyncio.ensure_future(transaction())
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(call)
        except TimeoutError:
            self._abandon(call)
            raise TaskStoreUnavailable(f"The database did not answer within {timeout:g} s.", retry_after=1) from None
        except asyncio.CancelledError:
            self._abandon(call)
            raise
        except (DBAPIError, OSError, PoolTimeout) as exc:
            raise TaskStoreUnavailable(f"The database failed: {type(exc).__name__}.", retry_after=1) from exc

    def _abandon(self, call: asyncio.Task[Any]) -> None:
        call.cancel()
        self._abandoned.add(call)
        call.add_done_callback(self._forget)

    def _forget(self, call: asyncio.Task[Any]) -> None:
        self._abandoned.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: its failure was reported when it was given up on


def _row(record: TaskRecord | Mapping[str, Any]) -> dict[str, Any]:
    """Every column of the record (missing ones at their defaults): the one row shape written."""
    if not isinstance(record, TaskRecord):
        unknown = sorted(set(record) - set(TASK_COLUMNS))
        if unknown:
            raise ValueError(f"not columns of the task table: {', '.join(unknown)}")
        try:
            record = TaskRecord.from_row(record)
        except KeyError as exc:
            raise ValueError(f"a task record needs {exc.args[0]}") from None
    return record.to_row()


def as_utc(moment: datetime) -> datetime:
    """Naive means UTC; an offset is converted, because SQLite compares the stored UTC text, not instants."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def encode_cursor(created_at: datetime, task_id: str) -> str:
    # Opaque to clients, so that the paging key can change without breaking them.
    micros = (as_utc(created_at) - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"t:{micros}:{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a next_cursor stands for; InvalidRequest (422) for anything this API did not hand out."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        text = ""
    prefix, _, rest = text.partition(":")
    digits, _, task_id = rest.partition(":")
    # The length check comes first: int() of thousands of digits is slow, and refused past 4,300.
    if (
        prefix != "t"
        or not (0 < len(digits) <= 18 and digits.isdigit() and int(digits) <= _MAX_MICROS)
        or not _CURSOR_ID.fullmatch(task_id)
    ):
        raise InvalidRequest(
            "cursor: not a next_cursor this API returned.",
            extra={"errors": [{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}]},
        )
    return _EPOCH + timedelta(microseconds=int(digits)), task_id
