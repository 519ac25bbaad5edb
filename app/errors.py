"""The error hierarchy: every refusal and fault carries its HTTP status, a stable code and retryability."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Base of every error Pacemaker renders; subclasses fix status, code and title."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"
    retryable: bool = False
    # A refusal for lack of capacity (busy, limited): it says nothing about a dependency's health.
    capacity_refusal: bool = False

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.retry_after = retry_after
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(self.detail)

    def problem(self, request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://pacemaker.dev/errors/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "request_id": request_id,
            "retryable": self.retryable,
        }
        body.update(self.extra)
        return body

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            # Retry-After is whole seconds; never tell a client to retry sooner than asked.
            headers["Retry-After"] = str(max(1, int(-(-self.retry_after // 1))))
        return headers


class InvalidRequest(AppError):
    status, code, title = 422, "invalid_request", "Invalid request"


class MalformedJSON(AppError):
    status, code, title = 400, "malformed_json", "Malformed JSON body"


class PayloadTooLarge(AppError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class NotFound(AppError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(AppError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class ModelNotFound(AppError):
    status, code, title = 404, "model_not_found", "Unknown model"


class Unauthenticated(AppError):
    status, code, title = 401, "invalid_api_key", "Missing or invalid API key"

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="pacemaker"', **super().response_headers()}


class AuthUnavailable(AppError):
    """The key store (the database) did not answer: not the caller's fault, and worth a retry."""

    status, code, title, retryable = 503, "auth_unavailable", "API keys cannot be checked right now", True


class ToolNotAllowed(AppError):
    status, code, title = 403, "tool_not_allowed", "Tool not allowed"


class TooManyTasks(AppError):
    status, code, title, retryable = 429, "too_many_tasks", "Too many tasks on this connection", True


class TooManySockets(AppError):
    status, code, title, retryable = 429, "too_many_websockets", "Too many WebSockets open for this key", True
    capacity_refusal = True


class TaskNotFound(AppError):
    # Also another key's task: a 403 would confirm that the id exists.
    status, code, title = 404, "task_not_found", "No such task"


class TaskFinished(AppError):
    status, code, title = 409, "task_finished", "The task has already finished"


class MalformedResume(AppError):
    status, code, title = 400, "invalid_resume_point", "Last-Event-ID or after is not a seq"


class EventsNotKept(AppError):
    status, code, title = 409, "events_not_kept", "Only background tasks keep their events"


class TooManyBackgroundTasks(AppError):
    status, code, title, retryable = 429, "too_many_background_tasks", "Too many background tasks for this key", True
    capacity_refusal = True


class ShuttingDown(AppError):
    status, code, title, retryable = 503, "shutting_down", "The server is shutting down", True


class WorkerLost(AppError):
    status, code, title, retryable = 503, "worker_lost", "The instance running the task stopped", True


class RequestTimeout(AppError):
    status, code, title, retryable = 504, "request_timeout", "Request timed out", True


class Cancelled(AppError):
    # 499 is the de-facto status for "client closed request"; it never reaches a client.
    status, code, title = 499, "cancelled", "Cancelled"


class MaxIterationsExceeded(AppError):
    status, code, title = 422, "max_iterations_exceeded", "The agent did not finish within max_iterations"


# Upstream faults: the provider layer raises these; retryable ones are worth a client retry.
class UpstreamError(AppError):
    status, code, title, retryable = 502, "upstream_error", "Upstream provider error", True


class UpstreamUnavailable(UpstreamError):
    status, code, title = 502, "upstream_unavailable", "Upstream provider unreachable"


class UpstreamTimeout(UpstreamError):
    status, code, title = 504, "upstream_timeout", "Upstream provider timed out"


class UpstreamRateLimited(UpstreamError):
    status, code, title = 503, "upstream_rate_limited", "Upstream provider is rate limiting"


class UpstreamProtocolError(UpstreamError):
    status, code, title = 502, "upstream_protocol_error", "Upstream sent an unreadable response"


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (4xx): retrying the same request will not help."""

    status, code, title, retryable = 400, "upstream_rejected", "Upstream provider rejected the request", False


class UpstreamAuthFailed(UpstreamError):
    """Our credentials for the upstream were refused: a configuration fault, not the caller's."""

    status, code, title, retryable = (
        502,
        "upstream_auth_failed",
        "Upstream provider refused our credentials",
        False,
    )


# Enforcement: refusals that say when to come back (Retry-After) where retrying makes sense.
class RateLimitExceeded(AppError):
    status, code, title, retryable = 429, "rate_limit_exceeded", "Rate limit exceeded", True
    capacity_refusal = True


class EdgeRateLimited(AppError):
    """Too many requests, or failed authentications, from one client address (app/edge/): before any key lookup."""

    status, code, title, retryable = 429, "edge_rate_limited", "Too many requests from this address", True
    capacity_refusal = True


class ConcurrencyLimitExceeded(AppError):
    status, code, title, retryable = 429, "concurrency_limit_exceeded", "Too many requests in flight for this key", True
    capacity_refusal = True


class Overloaded(AppError):
    # At its limit of requests in flight, or shedding load (app/overload.py): another instance may take it.
    status, code, title, retryable = 503, "overloaded", "The server is overloaded", True
    capacity_refusal = True


class TokenLimitExceeded(AppError):
    status, code, title = 400, "token_limit_exceeded", "The request would exceed its token limit"


class BudgetExceeded(AppError):
    status, code, title = 402, "budget_exceeded", "The key's budget is exhausted"


class CircuitOpen(AppError):
    status, code, title, retryable = 503, "circuit_open", "The upstream is failing; calls are paused", True


class LimiterUnavailable(AppError):
    status, code, title, retryable = 503, "limiter_unavailable", "Rate limiting is unavailable", True


class BudgetUnavailable(AppError):
    """The key's spend could not be read from the audit log in time: its budget cannot be checked."""

    status, code, title, retryable = 503, "budget_unavailable", "The key's budget cannot be checked right now", True


class IdempotencyInProgress(AppError):
    status, code, title, retryable = (
        409,
        "idempotency_in_progress",
        "A request with this Idempotency-Key is running",
        True,
    )


class IdempotencyUnavailable(AppError):
    status, code, title, retryable = 503, "idempotency_unavailable", "Idempotency keys cannot be checked", True


class IdempotencyConflict(AppError):
    status, code, title = 422, "idempotency_conflict", "This Idempotency-Key was used with a different request"


class Forbidden(AppError):
    """Authenticated, but this key may not do that (e.g. read other keys' audit rows without being admin)."""

    status, code, title = 403, "forbidden", "Forbidden"
