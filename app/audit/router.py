"""GET /v1/usage (a key's own totals) and GET /v1/audit (every row, for admin keys), read from the audit log."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from app.audit.models import AuditRecord
from app.audit.repository import AuditFilters, AuditRepository, UsageRow
from app.auth.principal import Principal
from app.dependencies import PrincipalDep, ResourcesDep
from app.errors import Forbidden, InvalidRequest
from app.problems import problem_responses

router = APIRouter(prefix="/v1", tags=["audit"])

_USD_PLACES = Decimal("0.000000001")  # the scale of audit_record.cost_usd
_USD_DESCRIPTION = "US dollars as an exact decimal string with 9 decimal places (never a float), e.g. '0.000123000'"
# Ids are positive BIGINTs; anything outside that range is no cursor this API handed out.
_MAX_ID = 2**63 - 1

AuditStatus = Literal["completed", "failed", "rejected", "cancelled", "timeout"]


class UsageTotals(BaseModel):
    requests: int = Field(description="Requests made, including refused ones")
    prompt_tokens: int
    completion_tokens: int
    cost_usd: str = Field(description=_USD_DESCRIPTION)


class UsageDay(UsageTotals):
    day: date = Field(description="The UTC day")
    model: str | None = Field(description="null for requests that used no model (refusals, reads)")


class UsageReport(BaseModel):
    data: list[UsageDay] = Field(description="Ordered by day, then model")
    totals: UsageTotals


class AuditRow(BaseModel):
    id: int
    request_id: str
    created_at: datetime = Field(description="When the request arrived (UTC)")
    finished_at: datetime = Field(description="When its response ended (UTC)")
    api_key_id: int | None = Field(description="null when the request carried no valid key")
    route: str = Field(description="The route template, e.g. /v1/tools/{name}/invoke")
    transport: str = Field(description="json, sse, ws, openai, tool or http")
    task_id: str | None
    mode: str | None
    tier: str | None
    model: str | None
    provider: str | None
    status: str = Field(description="completed, failed, rejected, cancelled or timeout")
    error_code: str | None
    http_status: int | None
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool = Field(description="Tokens were counted locally: the provider reported none")
    cost_usd: str = Field(description=_USD_DESCRIPTION)
    latency_ms: float
    ttft_ms: float | None = Field(description="Time to the first token of a stream")
    tool_call_count: int
    tool_names: list[str] = Field(description="The tools called, in call order")
    retries: int
    client_ip: str | None
    user_agent: str | None
    session_id: str | None = Field(description="The conversation (session_id) of the task, if any")
    trace_id: str | None = Field(description="The W3C trace id of the request, when tracing is on")
    prompt: str | None = Field(description="Kept only when audit.store_content is on, and then truncated")
    output: str | None = Field(description="Kept only when audit.store_content is on, and then truncated")


class AuditPage(BaseModel):
    data: list[AuditRow] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("Reading the audit log takes an admin key; GET /v1/usage shows your own usage.")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


@router.get(
    "/usage",
    response_model=UsageReport,
    summary="Your own usage by day and model",
    responses=problem_responses(401, 422),
)
async def get_usage(
    principal: PrincipalDep,
    resources: ResourcesDep,
    since: Annotated[date | None, Query(description="First UTC day included (YYYY-MM-DD)")] = None,
    until: Annotated[date | None, Query(description="Last UTC day included (YYYY-MM-DD)")] = None,
) -> UsageReport:
    if since is not None and until is not None and since > until:
        raise InvalidRequest(f"since ({since}) is after until ({until}).")
    if until == date.max:
        until = None  # the last day there is: no upper bound (the day after it cannot be computed)
    async with resources.session_maker() as session:
        rows = await AuditRepository(session).usage_by_day_and_model(principal.key_id, since, until)
    return UsageReport(
        data=[
            UsageDay(
                day=row.day,
                model=row.model,
                requests=row.requests,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                cost_usd=_usd(row.cost_usd),
            )
            for row in rows
        ],
        totals=_totals(rows),
    )


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="Every key's audit rows, newest first (admin keys only)",
    responses=problem_responses(401, 403, 422),
)
async def get_audit(
    _admin: AdminDep,
    resources: ResourcesDep,
    # Bounded to the column's 32-bit range: a larger number would reach PostgreSQL and fail there as a 500.
    api_key_id: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="Only this key's rows")] = None,
    status: Annotated[AuditStatus | None, Query(description="Only rows with this outcome")] = None,
    model: Annotated[
        str | None, Query(max_length=120, pattern=r"^[^\x00]*$", description="Only rows for this model")
    ] = None,
    since: Annotated[datetime | None, Query(description="created_at at or after this (ISO 8601; naive is UTC)")] = None,
    until: Annotated[datetime | None, Query(description="created_at before this (ISO 8601; naive is UTC)")] = None,
    cursor: Annotated[str | None, Query(description="The next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Rows per page")] = 100,
) -> AuditPage:
    filters = AuditFilters(
        api_key_id=api_key_id,
        status=status,
        model=model,
        since=instant("since", since),
        until=instant("until", until),
    )
    after = _decode_cursor(cursor) if cursor is not None else None
    async with resources.session_maker() as session:
        records, next_id = await AuditRepository(session).page(filters, after, limit)
    return AuditPage(
        data=[_audit_row(record) for record in records],
        next_cursor=_encode_cursor(next_id) if next_id is not None else None,
    )


def instant(name: str, moment: datetime | None) -> datetime | None:
    """The moment in UTC (naive means UTC), or a 422 for one that has no UTC equivalent (year 1 at +14:00)."""
    if moment is None:
        return None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest(
            f"{name}: {moment.isoformat()} is outside the range of UTC times.",
            extra={"errors": [{"loc": ["query", name], "msg": "out of range", "type": "value_error"}]},
        ) from None


def _usd(value: Decimal) -> str:
    # Fixed-point: str(Decimal) would say '0E-9' for a zero read back at scale 9.
    return f"{value.quantize(_USD_PLACES):f}"


def _totals(rows: list[UsageRow]) -> UsageTotals:
    return UsageTotals(
        requests=sum(row.requests for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        cost_usd=_usd(sum((row.cost_usd for row in rows), Decimal(0))),
    )


def _audit_row(record: AuditRecord) -> AuditRow:
    assert record.id is not None, "rows read from the table have ids"
    return AuditRow(
        **record.model_dump(exclude={"id", "created_at", "finished_at", "cost_usd", "tool_names"}),
        id=record.id,
        created_at=_utc(record.created_at),
        finished_at=_utc(record.finished_at),
        cost_usd=_usd(record.cost_usd),
        tool_names=record.tool_names.split(",") if record.tool_names else [],
    )


def _utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their offset; the writer stored them in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _encode_cursor(last_id: int) -> str:
    # Opaque to clients, so that the paging key can change without breaking them.
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        text = ""
    prefix, _, digits = text.partition(":")
    # The length check comes first: int() of thousands of digits is slow, and refused past 4,300.
    if prefix != "id" or not (0 < len(digits) <= 19 and digits.isdigit()) or not 0 < int(digits) <= _MAX_ID:
        raise InvalidRequest(
            "cursor: not a next_cursor this API returned.",
            extra={"errors": [{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}]},
        )
    return int(digits)
