"""A running task's deadline, and the one way to end it early: cancel() brings the deadline forward to now."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from app.errors import AppError, Cancelled

T = TypeVar("T")


class RunControl:
    """Bounds every await of a task by its deadline; cancel() makes the one in progress (and every later
    one) end at once with `Cancelled` (or the reason given), which the runner reports as its last event.

    Cancelling through the deadline, rather than cancelling the asyncio task that consumes the
    events, leaves the consumer (a response, a socket, a background runner) in charge of its own
    lifetime: it still gets the final event, and nothing has to tell a cancellation it asked for
    from one that asyncio does on shutdown.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline: float | None = None  # set when the run starts
        self.cancelled = False
        self._reason: AppError = Cancelled("The task was cancelled.")
        self._scopes: set[asyncio.Timeout] = set()

    def start(self) -> None:
        self.deadline = asyncio.get_running_loop().time() + self.timeout_s

    def cancel(self, reason: AppError | None = None) -> None:
        """End the task now (safe at any time, also before it starts or after it ended); `reason` is the
        error its last event reports (default: cancelled)."""
        if self.cancelled:
            return
        self.cancelled = True
        if reason is not None:
            self._reason = reason
        now = asyncio.get_running_loop().time()
        for scope in self._scopes:
            scope.reschedule(now)

    async def within(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` before the deadline: TimeoutError when it passes, Cancelled once cancelled.

        Never wraps a yield: a suspended generator would carry the scope into its consumer.
        """
        if self.cancelled:
            _close(awaitable)
            raise self._reason
        try:
            async with asyncio.timeout_at(self.deadline) as scope:
                self._scopes.add(scope)
                try:
                    return await awaitable
                finally:
                    self._scopes.discard(scope)
        except TimeoutError:
            if self.cancelled:
                raise self._reason from None
            raise


def _close(awaitable: Awaitable[object]) -> None:
    # A coroutine that will never be awaited is closed, so Python does not warn about it.
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
