"""Sandbox errors: refusals the API renders (AppError) and the startup failure that stops the app."""

from __future__ import annotations

from typing import Any

from app.errors import AppError


class SandboxBusy(AppError):
    """Every worker is busy and the wait queue is full: come back in a second."""

    status, code, title, retryable = 503, "sandbox_busy", "The code sandbox is at capacity", True
    capacity_refusal = True

    def __init__(self, detail: str | None = None, *, retry_after: float | None = 1.0, **kwargs: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **kwargs)


class SandboxUnavailable(AppError):
    """The sandbox is not started (or is shutting down)."""

    status, code, title, retryable = 503, "sandbox_unavailable", "The code sandbox is not running", True


class SandboxSetupError(RuntimeError):
    """The runtime cannot be trusted or built (hash mismatch, failed compile): the app must not start."""
