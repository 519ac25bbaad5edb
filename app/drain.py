"""Graceful drain on SIGTERM or SIGINT: stop taking work, let in-flight work end, then let uvicorn exit 0.

The sequence (the README's Operations section has it for operators):
1. readiness answers 503 (`draining`) at once, while the listener stays open for
   `server.drain_grace_s`, so load balancers stop sending;
2. new tasks, chat completions, tool calls and sockets get `503 shutting_down` (Retry-After,
   Connection: close); reads, health and metrics keep answering;
3. in-flight work (JSON requests, SSE streams, WebSocket and background tasks) runs to its end for
   up to `server.drain_timeout_s`;
4. what still runs then ends with `task.failed` (`shutting_down`, retryable), its audit row and
   its record; WebSockets get their tasks' final events, then close 1012;
5. uvicorn is asked to exit: the listener closes, the audit and task writers write what they hold
   to the database while it answers, and the process exits 0.
A second signal skips the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from app.errors import ShuttingDown

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the drain timeout, how long the cancelled tasks get to write their final event and records.
FINAL_EVENTS_S = 5.0


def new_work_refused() -> ShuttingDown:
    """What new work gets while draining; Connection: close sends the client's retry elsewhere."""
    return ShuttingDown(
        "This instance is shutting down; send the request again (another instance will take it).",
        retry_after=1.0,
        headers={"Connection": "close"},
    )


class Restartable(Protocol):
    async def restart(self) -> None:
        """Close once what is queued has gone out (WebSocket close 1012)."""


class Drain:
    """The drain of one process: `begin()` starts it; work in flight is told by `draining`."""

    def __init__(
        self,
        *,
        grace_s: float,
        timeout_s: float,
        busy: Callable[[], int],
        cancel_all: Callable[[ShuttingDown], None],
    ) -> None:
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self._busy = busy  # requests and tasks in flight on this instance
        self._cancel_all = cancel_all
        self.sockets: set[Restartable] = set()  # open WebSockets, closed 1012 at the end
        self.draining = False
        self._hurry = asyncio.Event()  # a second signal: stop waiting
        self._done: asyncio.Task[None] | None = None
        self._on_done: Callable[[], None] | None = None

    def begin(self, on_done: Callable[[], None]) -> None:
        """Start draining (a second call hurries the one in progress)."""
        if self.draining:
            log.warning("second signal: ending in-flight work now")
            self._hurry.set()
            return
        self.draining = True
        self._on_done = on_done
        log.info(
            "draining: readiness is 503; in-flight work has %g s to end (grace %g s)", self.timeout_s, self.grace_s
        )
        self._done = asyncio.get_running_loop().create_task(self._run(), name="drain")

    async def _run(self) -> None:
        try:
            started = time.monotonic()
            await self._wait(self.grace_s, lambda: False)  # the listener stays open: balancers see 503s first
            remaining = max(0.0, self.timeout_s - (time.monotonic() - started))
            await self._wait(remaining, lambda: self._busy() == 0)
            if self._busy():
                log.warning("drain timeout: ending %d requests and tasks with shutting_down", self._busy())
                self._cancel_all(ShuttingDown("The server is shutting down; start the task again.", retry_after=1.0))
                await self._wait(FINAL_EVENTS_S, lambda: self._busy() == 0)
            for socket in list(self.sockets):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(socket.restart(), 1.0)  # a socket whose outbox is full is cut
        except Exception:
            log.exception("drain failed; exiting")
        finally:
            if self._on_done is not None:
                self._on_done()

    async def _wait(self, seconds: float, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + seconds
        while not done() and not self._hurry.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), min(0.05, left))


def install_signal_handlers(drain: Drain) -> bool:
    """Take SIGTERM and SIGINT from uvicorn's Server, draining first and then asking it to exit.

    uvicorn's own handler makes it stop listening at once, and re-raises the signal after its
    shutdown (the process then dies of it, exit status -15); ours drains and sets its
    `should_exit`, so the process ends normally with 0. Only when running under uvicorn's Server
    (its handler is installed before the app starts); False otherwise (tests building the app).
    """
    server: Any = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if server is None or not hasattr(server, "should_exit"):
        return False
    loop = asyncio.get_running_loop()

    def exit_now() -> None:
        server.should_exit = True

    def handle(_signum: int, _frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(drain.begin, exit_now)

    for sig in SIGNALS:
        signal.signal(sig, handle)
    return True
