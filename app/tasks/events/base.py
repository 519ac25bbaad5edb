"""What every event log backend shares: the logged event, the protocols, the errors and the reader."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from app.agent.events import TERMINAL_EVENTS
from app.errors import AppError

# The terminal event types, by name: a log ends with exactly one of them.
TERMINAL_TYPES = frozenset(event.model_fields["type"].default for event in TERMINAL_EVENTS)


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One event as logged, its JSON exactly as renderers send it.

    `data` must be a bytes object of exactly its length, as `model_dump_json().encode()` makes:
    orjson.dumps results keep a 4 KiB buffer each (measured: 4,120 bytes of RSS for a 46-byte
    result), which no byte bound here can see; copy those first (`memoryview(data).tobytes()`).
    Copying on every add() instead would cost more than the add itself (measured: 0.65 -> 1.65 us).
    """

    seq: int  # 1..N, the event's own seq
    type: str  # the event's type (task.started, token.delta, ..., task.completed, task.failed)
    data: bytes  # the event serialised as JSON, exactly what a renderer sends (never re-encoded)


class UnknownTask(AppError):
    """The log holds nothing for this task: never written, evicted or expired."""

    status, code, title = 404, "task_not_found", "Unknown task"


class EventsGone(AppError):
    """Events the reader asked for were dropped by a bound; `oldest` is the next seq stored after them."""

    status, code, title = 410, "events_gone", "Events no longer stored"

    def __init__(self, task_id: str, after: int, oldest: int) -> None:
        super().__init__(
            f"Task {task_id}: events after seq {after} are no longer stored (the next one kept is {oldest}).",
            extra={"oldest_seq": oldest},
        )
        self.oldest = oldest


class EventWriter(Protocol):
    def add(self, event: LoggedEvent) -> None:
        """Synchronous, O(1) and never waits on storage; events come in seq order, 1, 2, 3, ..."""

    async def flush(self) -> None:
        """Waits until every event added so far is stored and the task is known to every reader."""

    async def close(self) -> None:
        """Flushes everything added (the terminal event last), then starts the retention clock."""


class EventLog(Protocol):
    def writer(self, task_id: str) -> EventWriter:
        """The one writer of a task, on the instance that runs it."""

    def read(self, task_id: str, after: int = 0) -> EventReader:
        """Stored events with seq > after, then live ones, ending after the terminal event."""

    async def append_final(self, task_id: str, event_type: str, make_data: Callable[[int], bytes]) -> int:
        """Ends the log of a task whose writer died with one terminal event; its seq, or 0 if it had ended."""

    async def aclose(self) -> None:
        """Flushes what writers still hold (within a bound) and stops them."""


class EventReader:
    """What read() returns: an async iterator of LoggedEvent that checks the log before the first wait.

    `await reader.start()` raises UnknownTask or EventsGone at once (a route answers 404 or 410
    before sending headers) and otherwise returns without waiting for an event; iterating calls it
    when it was not called. Later, a reader raises EventsGone if the log loses events it has yet to
    read. Close it (`aclose()`, or `contextlib.aclosing`) when stopping early.
    """

    __slots__ = ("_events", "_open")

    def __init__(self, open_: Callable[[], Awaitable[AsyncIterator[LoggedEvent]]]) -> None:
        self._open: Callable[[], Awaitable[AsyncIterator[LoggedEvent]]] | None = open_
        self._events: AsyncIterator[LoggedEvent] | None = None

    async def start(self) -> None:
        if self._open is not None:
            open_, self._open = self._open, None
            self._events = await open_()

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> LoggedEvent:
        if self._events is None:
            await self.start()
            if self._events is None:  # closed before it started
                raise StopAsyncIteration
        return await self._events.__anext__()

    async def aclose(self) -> None:
        self._open = None
        events, self._events = self._events, None
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
