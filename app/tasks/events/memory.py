"""The embedded event log: each task's events in a list in this process, bounded in bytes and per task."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from app.tasks.events.base import TERMINAL_TYPES, EventReader, EventsGone, LoggedEvent, UnknownTask

logger = logging.getLogger(__name__)

# What an event costs beyond its JSON, from sys.getsizeof: the LoggedEvent (56), the bytes object's
# header (33), its seq int (28) and its list slot (8). Counted so that max_bytes bounds real memory.
EVENT_OVERHEAD = 128
# A task's own objects: its _TaskLog, its list, its id and its entries in two dicts.
TASK_OVERHEAD = 512
# A trimmed slot; a placeholder rather than None keeps the list's type (and readers) simple.
_TRIMMED = LoggedEvent(0, "", b"")
# Trimmed slots are given back once they are this many and at least half the list.
_COMPACT_AT = 1024


class _TaskLog:
    """One task's events: events[i] has seq base + i; the slots before `head` were trimmed."""

    __slots__ = ("base", "bytes", "changed", "ended", "events", "finished_at", "gone", "head", "next_seq", "task_id")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.events: list[LoggedEvent] = []
        self.base = 1
        self.head = 0
        self.next_seq = 1
        self.bytes = TASK_OVERHEAD
        self.ended = False  # holds its terminal event
        self.finished_at: float | None = None  # closed (or finalised): the retention clock runs
        self.gone = False  # evicted or expired: its events were let go of
        # Set (and replaced) whenever the log changes; made only when a reader waits.
        self.changed: asyncio.Event | None = None

    @property
    def first_seq(self) -> int:
        """The oldest seq stored (next_seq when none is)."""
        return self.base + self.head

    def wake(self) -> None:
        changed = self.changed
        if changed is not None:
            self.changed = None
            changed.set()


class MemoryEventLog:
    """Bounded in total bytes (finished tasks evicted oldest-finished first) and in events per task.

    Over `max_bytes` with no finished task left to evict, the task being written gives up its own
    oldest events (never its newest). Finished tasks expire `retention_s` after they finish.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_events_per_task: int = 100_000,
        retention_s: float = 86_400.0,
    ) -> None:
        if max_events_per_task < 1:
            raise ValueError("max_events_per_task must be at least 1")
        self._max_bytes = max_bytes
        self._max_events = max_events_per_task
        self._retention_s = retention_s
        self._logs: dict[str, _TaskLog] = {}
        self._finished: OrderedDict[str, _TaskLog] = OrderedDict()  # oldest finished first
        self._bytes = 0
        self._sweep_handle: asyncio.TimerHandle | None = None

    @property
    def stored_bytes(self) -> int:
        """What the bound counts: every stored event's JSON plus EVENT_OVERHEAD, plus TASK_OVERHEAD per task."""
        return self._bytes

    def writer(self, task_id: str) -> MemoryEventWriter:
        self._sweep()
        if task_id in self._logs:
            raise ValueError(f"task {task_id} already has an event log")
        log = _TaskLog(task_id)
        self._logs[task_id] = log
        self._bytes += TASK_OVERHEAD
        self._make_room(log)
        return MemoryEventWriter(self, log)

    def read(self, task_id: str, after: int = 0) -> EventReader:
        if after < 0:
            raise ValueError("after must be 0 or more")

        async def open_() -> AsyncIterator[LoggedEvent]:
            self._sweep()
            log = self._logs.get(task_id)
            if log is None:
                raise UnknownTask(f"No events are stored for task {task_id}.")
            if after + 1 < log.first_seq:
                raise EventsGone(task_id, after, log.first_seq)
            return self._follow(log, after)

        return EventReader(open_)

    async def append_final(self, task_id: str, event_type: str, make_data: Callable[[int], bytes]) -> int:
        if event_type not in TERMINAL_TYPES:
            raise ValueError(f"{event_type} is not a terminal event type")
        self._sweep()
        log = self._logs.get(task_id)
        if log is None:
            log = self._logs[task_id] = _TaskLog(task_id)
            self._bytes += TASK_OVERHEAD
        # No await from the check to the append: two callers cannot both append. The event is built
        # again if make_data let the dead writer add one meanwhile.
        while not log.ended:
            seq = log.next_seq
            data = make_data(seq)
            if log.next_seq == seq and not log.ended:
                self.append(log, LoggedEvent(seq, event_type, data))
                self.finish(log)
                return seq
        return 0

    async def aclose(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    # The writer's side.

    def append(self, log: _TaskLog, event: LoggedEvent) -> None:
        # The hot path: once per token of every task.
        if log.ended:
            return  # ended (by its terminal event, or finalised by append_final): nothing follows it
        seq = event.seq
        if seq != log.next_seq:
            raise ValueError(f"task {log.task_id}: event seq {seq} added, {log.next_seq} expected")
        events = log.events
        events.append(event)
        log.next_seq = seq + 1
        size = len(event.data) + EVENT_OVERHEAD
        log.bytes += size
        self._bytes += size
        if event.type in TERMINAL_TYPES:
            log.ended = True
        if len(events) - log.head > self._max_events:
            self._trim_oldest(log)
        if self._bytes > self._max_bytes:
            self._make_room(log)
        if log.changed is not None:
            log.wake()

    def finish(self, log: _TaskLog) -> None:
        if log.finished_at is not None or log.gone:
            return
        log.finished_at = time.monotonic()
        self._finished[log.task_id] = log
        self._make_room(None)
        self._schedule_sweep()

    # Bounds.

    def _trim_oldest(self, log: _TaskLog) -> None:
        event = log.events[log.head]
        log.events[log.head] = _TRIMMED
        log.head += 1
        size = len(event.data) + EVENT_OVERHEAD
        log.bytes -= size
        self._bytes -= size
        if log.head >= _COMPACT_AT and log.head * 2 >= len(log.events):
            # Amortised O(1): each slot is moved at most once per halving.
            del log.events[: log.head]
            log.base += log.head
            log.head = 0

    def _make_room(self, writing: _TaskLog | None) -> None:
        while self._bytes > self._max_bytes and self._finished:
            _, oldest = self._finished.popitem(last=False)
            self._drop(oldest)
        if writing is not None:
            # Only running tasks are left: the one adding bytes pays, down to its newest event.
            while self._bytes > self._max_bytes and len(writing.events) - writing.head > 1:
                self._trim_oldest(writing)

    def _drop(self, log: _TaskLog) -> None:
        """Lets go of a finished task's events; its readers wake and see EventsGone (or the end)."""
        self._finished.pop(log.task_id, None)
        if self._logs.get(log.task_id) is log:
            del self._logs[log.task_id]
        self._bytes -= log.bytes
        log.bytes = 0
        log.events = []
        log.base = log.next_seq
        log.head = 0
        log.gone = True
        log.wake()

    def _sweep(self) -> None:
        if not self._finished:
            return
        expired_before = time.monotonic() - self._retention_s
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if oldest.finished_at is None or oldest.finished_at > expired_before:
                break
            self._drop(oldest)

    def _schedule_sweep(self) -> None:
        # One timer for the whole log, at the oldest finished task's expiry: memory is given back
        # on time even when nothing else happens.
        if self._sweep_handle is not None or not self._finished:
            return
        oldest = next(iter(self._finished.values()))
        assert oldest.finished_at is not None
        delay = max(0.0, oldest.finished_at + self._retention_s - time.monotonic())
        self._sweep_handle = asyncio.get_running_loop().call_later(delay, self._on_sweep_timer)

    def _on_sweep_timer(self) -> None:
        self._sweep_handle = None
        self._sweep()
        self._schedule_sweep()

    # The reader's side.

    async def _follow(self, log: _TaskLog, after: int) -> AsyncIterator[LoggedEvent]:
        next_seq = after + 1
        while True:
            # Checked again after every yield: the log may have been trimmed or dropped meanwhile.
            if next_seq < log.first_seq:
                raise EventsGone(log.task_id, next_seq - 1, log.first_seq)
            index = next_seq - log.base
            if index < len(log.events):
                event = log.events[index]
                yield event
                if event.type in TERMINAL_TYPES:
                    return
                next_seq += 1
                continue
            if log.ended:
                return  # asked for events after the terminal one: there are none
            if log.gone:
                raise UnknownTask(f"The events of task {log.task_id} were let go of before it ended.")
            if log.changed is None:
                log.changed = asyncio.Event()
            await log.changed.wait()


class MemoryEventWriter:
    __slots__ = ("_closed", "_log", "_store")

    def __init__(self, store: MemoryEventLog, log: _TaskLog) -> None:
        self._store = store
        self._log = log
        self._closed = False

    def add(self, event: LoggedEvent) -> None:
        if self._closed:
            raise RuntimeError(f"task {self._log.task_id}: event added after its writer was closed")
        self._store.append(self._log, event)

    async def flush(self) -> None:
        """Nothing to wait for: add() stored the event."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._log.ended:
            logger.warning("task %s: event writer closed without a terminal event", self._log.task_id)
        self._store.finish(self._log)
