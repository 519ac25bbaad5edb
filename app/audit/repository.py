"""SQL for reading the audit log: usage totals, a key's spend, and keyset pages of rows. Callers own the session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from sqlalchemy import BigInteger, Date, cast, delete, func
from sqlalchemy import select as sa_select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.audit.models import AuditRecord

_NANOS_PER_USD = 1_000_000_000


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: date
    model: str | None  # None for requests that never reached a model (refusals, reads like this one)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


@dataclass(frozen=True, slots=True)
class AuditFilters:
    """Every field narrows the rows; None leaves that column unfiltered. since <= created_at < until."""

    api_key_id: int | None = None
    status: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def usage_by_day_and_model(self, api_key_id: int, since: date | None, until: date | None) -> list[UsageRow]:
        """One key's totals per UTC day and model, both days inclusive, ordered by day then model."""
        day = _utc_day(self.session.get_bind().dialect.name)
        query = select(  # type: ignore[call-overload]  # sqlmodel's select overloads stop at 4 columns
            day.label("day"),
            col(AuditRecord.model),
            func.count().label("requests"),
            func.sum(AuditRecord.prompt_tokens),
            func.sum(AuditRecord.completion_tokens),
            func.sum(AuditRecord.cost_usd),
        ).where(AuditRecord.api_key_id == api_key_id)
        # Bounds on created_at itself, not on the day expression, so the (api_key_id, created_at) index serves them.
        if since is not None:
            query = query.where(col(AuditRecord.created_at) >= _utc_midnight(since))
        if until is not None:
            query = query.where(col(AuditRecord.created_at) < _utc_midnight(until + timedelta(days=1)))
        # NULLS FIRST spelled out: PostgreSQL and SQLite disagree on where NULL sorts by default.
        query = query.group_by(day, col(AuditRecord.model)).order_by(day, col(AuditRecord.model).nulls_first())
        rows = (await self.session.exec(query)).all()
        return [
            UsageRow(
                day=row[0],
                model=row[1],
                requests=row[2],
                prompt_tokens=int(row[3]),
                completion_tokens=int(row[4]),
                cost_usd=Decimal(row[5]),
            )
            for row in rows
        ]

    async def spent_since(self, api_key_id: int, since: datetime | None) -> Decimal:
        """One key's summed cost_usd over rows created at or after `since` (None: all its rows), exactly."""
        cost = col(AuditRecord.cost_usd)
        in_nanos = self.session.get_bind().dialect.name == "sqlite"
        # SQLite keeps each cost as a float: each is rounded back to its whole nano-USD (it has 9
        # decimal places), so the sum is an exact integer rather than a sum of float errors.
        # PostgreSQL's NUMERIC sums exactly as it is.
        total = func.sum(cast(func.round(cost * _NANOS_PER_USD), BigInteger)) if in_nanos else func.sum(cost)
        query = select(total).where(AuditRecord.api_key_id == api_key_id)
        if since is not None:
            query = query.where(col(AuditRecord.created_at) >= _as_utc(since))  # the (api_key_id, created_at) index
        value = (await self.session.exec(query)).one()
        if value is None:
            return Decimal(0)  # no rows
        assert isinstance(value, int | Decimal)
        return Decimal(value).scaleb(-9) if in_nanos else Decimal(value)

    async def cost_by_model(self, since: datetime, until: datetime) -> dict[str | None, Decimal]:
        """Every key's summed cost_usd per model over rows created in [since, until) (the created_at index)."""
        query = (
            select(col(AuditRecord.model), func.sum(AuditRecord.cost_usd))
            .where(col(AuditRecord.created_at) >= _as_utc(since), col(AuditRecord.created_at) < _as_utc(until))
            .group_by(col(AuditRecord.model))
        )
        return {model: Decimal(total or 0) for model, total in (await self.session.exec(query)).all()}

    async def page(
        self, filters: AuditFilters, cursor: int | None, limit: int
    ) -> tuple[Sequence[AuditRecord], int | None]:
        """Up to `limit` rows with id < cursor, newest id first, and the cursor of the next page (None: no more).

        Ids grow with every insert, so rows written while a client pages land above its cursor:
        every row that existed when paging began is returned exactly once.
        """
        query = select(AuditRecord)
        if filters.api_key_id is not None:
            query = query.where(AuditRecord.api_key_id == filters.api_key_id)
        if filters.status is not None:
            query = query.where(AuditRecord.status == filters.status)
        if filters.model is not None:
            query = query.where(AuditRecord.model == filters.model)
        if filters.since is not None:
            query = query.where(col(AuditRecord.created_at) >= _as_utc(filters.since))
        if filters.until is not None:
            query = query.where(col(AuditRecord.created_at) < _as_utc(filters.until))
        if cursor is not None:
            query = query.where(col(AuditRecord.id) < cursor)
        # One row beyond the page tells whether another page exists, without a count or an empty last page.
        query = query.order_by(col(AuditRecord.id).desc()).limit(limit + 1)
        rows = (await self.session.exec(query)).all()
        if len(rows) <= limit:
            return rows, None
        rows = rows[:limit]
        return rows, rows[-1].id

    async def delete_before(self, cutoff: datetime, batch_size: int) -> int:
        """Delete one batch of rows created before `cutoff`; the number deleted (0: nothing left)."""
        table = AuditRecord.__table__  # type: ignore[attr-defined]
        oldest = sa_select(table.c.id).where(table.c.created_at < _as_utc(cutoff)).limit(batch_size)
        result = await self.session.execute(delete(table).where(table.c.id.in_(oldest.scalar_subquery())))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _utc_day(dialect: str) -> ColumnElement[date]:
    """The UTC calendar day of created_at, as SQL valid on this dialect."""
    created_at = col(AuditRecord.created_at)
    if dialect == "sqlite":
        # SQLite keeps DateTime as text, 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC (the writer stores UTC,
        # the offset is dropped); date() takes its day, and the Date type parses the result.
        return func.date(created_at, type_=Date)
    # timestamptz AT TIME ZONE 'UTC' is the UTC wall clock, whatever the session's TimeZone.
    return cast(func.timezone("UTC", created_at), Date)


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _as_utc(moment: datetime) -> datetime:
    """Naive means UTC; an offset is converted, because SQLite compares the stored UTC text, not instants."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
