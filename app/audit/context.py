"""What a request leaves in the audit log, gathered along its way and turned into one row at its end."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from app.ids import new_id
from app.providers.base import Usage

audit_var: ContextVar[AuditContext | None] = ContextVar("audit", default=None)


@dataclass(slots=True)
class AuditContext:
    request_id: str
    route: str
    transport: str
    client_ip: str | None = None
    user_agent: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    api_key_id: int | None = None
    task_id: str | None = None
    mode: str | None = None
    tier: str | None = None
    model: str | None = None
    provider: str | None = None
    # Set by whoever knows the outcome best (a stream's end); otherwise derived from the HTTP status.
    status: str | None = None
    error_code: str | None = None
    http_status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    cost_usd: Decimal = Decimal(0)
    ttft_ms: float | None = None
    tool_names: list[str] = field(default_factory=list)
    retries: int = 0
    session_id: str | None = None
    trace_id: str | None = None
    prompt: str | None = None
    output: str | None = None
    # The task service writes this row when the task ends (app/tasks/service.py); the middleware does not.
    owned_by_task: bool = False

    def add_call(self, usage: Usage, cost: Decimal, *, estimated: bool, retries: int) -> None:
        """One model call's spend (also a failed or cancelled one: what it used so far)."""
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += cost
        self.usage_estimated |= estimated and usage.total_tokens > 0
        self.retries += retries

    def first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = round((time.perf_counter() - self.started) * 1000, 3)

    def row(self) -> dict[str, Any]:
        """The audit_record row, with values the JSON journal can carry (journal.py; the sink makes text storable)."""
        return {
            "record_uid": new_id(),
            "request_id": self.request_id,
            "created_at": self.created_at,
            "finished_at": datetime.now(UTC),
            "api_key_id": self.api_key_id,
            "route": self.route,
            "transport": self.transport,
            "task_id": self.task_id,
            "mode": self.mode,
            "tier": self.tier,
            "model": self.model,
            "provider": self.provider,
            "status": self.status or _status_from_http(self.http_status, self.error_code),
            "error_code": self.error_code,
            "http_status": self.http_status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_estimated": self.usage_estimated,
            "cost_usd": self.cost_usd,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "ttft_ms": self.ttft_ms,
            "tool_call_count": len(self.tool_names),
            "tool_names": _joined(self.tool_names, 1000),
            "retries": self.retries,
            "client_ip": self.client_ip,
            "user_agent": self.user_agent,
            "session_id": self.session_id,
            "trace_id": self.trace_id,
            "prompt": self.prompt,
            "output": self.output,
        }


def _joined(names: list[str], limit: int) -> str | None:
    """Comma-separated, cut at a name boundary so that no name is left half."""
    text = ",".join(names)
    if len(text) > limit:
        text = text[: text.rfind(",", 0, limit + 1)] if "," in text[: limit + 1] else ""
    return text or None


def note_error(code: str) -> None:
    """Tell the current request's audit context which error it ended with."""
    context = audit_var.get()
    if context is not None:
        context.error_code = code


def _status_from_http(http_status: int | None, error_code: str | None) -> str:
    if error_code == "request_timeout":
        return "timeout"
    if error_code == "cancelled":
        return "cancelled"
    if http_status is None or http_status >= 500:
        return "failed"
    if http_status >= 400:
        return "rejected"
    return "completed"


def outcome_status(outcome: str) -> tuple[str, str | None]:
    """A task's outcome (completed, an error code, or cancelled) as (status, error_code)."""
    if outcome == "completed":
        return "completed", None
    if outcome == "cancelled":
        return "cancelled", None
    if outcome == "request_timeout":
        return "timeout", outcome
    return "failed", outcome
