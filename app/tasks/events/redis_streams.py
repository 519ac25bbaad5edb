"""The shared event log: one Redis stream per task, entry IDs `<seq>-0`, written in batches off the hot path."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.tasks.events.base import TERMINAL_TYPES, EventReader, EventsGone, LoggedEvent, UnknownTask
from app.tasks.events.redis_scripts import APPEND_LUA, FINAL_LUA, READ_LUA, pack_events, unpack_events

logger = logging.getLogger(__name__)

# Before its first event a task's stream holds this entry, so that readers anywhere know the task;
# every event's ID is above it and no reader range includes it.
OPEN_ID = "0-1"
# A running task's stream outlives its last write by this much (or retention_s, if longer): a writer
# that died with nobody to finalise its log leaves nothing behind for long.
RUNNING_TTL_S = 86_400.0
# One script call at most: a task's batch must not hold Redis (single-threaded) for long.
MAX_BATCH = 1024
MAX_BATCH_BYTES = 1024 * 1024
# Entries per page read: small for the first (a resume's first event is what a client waits for).
FIRST_PAGE = 64
PAGE = 1024
# The longest XREAD BLOCK; readers loop, checking that the stream still exists between blocks.
BLOCK_MS = 2000
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


def build_reader_redis(url: str, *, max_connections: int = 1024) -> Redis:
    """A client for readers: each reader waiting in XREAD BLOCK holds one of its connections.

    Kept apart from the client writers and the limiter use, so that many waiting readers never
    delay a batch or an admission; its socket timeout outlasts a block.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=1.0,
        socket_connect_timeout=0.25,
        socket_timeout=BLOCK_MS / 1000 + 1.0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=2,
    )
    return Redis.from_pool(pool)


def _backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * min(RETRY_MAX_S, RETRY_FIRST_S * 2.0**attempt)


class RedisEventLog:
    """Task events in `{prefix}:{task_id}` streams, shared by every instance.

    `redis` serves writers and append_final, `readers` serves readers (default: `redis`, whose
    socket timeout then bounds each XREAD block). Neither client is owned: whoever built them
    closes them. Both must return bytes (decode_responses off).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        readers: Redis | None = None,
        prefix: str = "pacemaker:events",
        retention_s: float = 86_400.0,
        max_events_per_task: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        batch_ms: float = 25.0,
        batch_events: int = 32,
        give_up_s: float = 10.0,
    ) -> None:
        self._readers = readers or redis
        for client in {id(redis): redis, id(self._readers): self._readers}.values():
            if client.get_encoder().decode_responses:  # type: ignore[no-untyped-call]
                raise ValueError("the event log needs a Redis client that returns bytes (decode_responses off)")
        self._prefix = prefix
        self.retention_ms = max(1, round(retention_s * 1000))
        self.running_ttl_ms = max(self.retention_ms, round(RUNNING_TTL_S * 1000))
        self.max_events = max_events_per_task
        self.max_buffered = max_bytes
        self.buffered = 0  # bytes of events added and not yet written (or dropped), all writers
        self.batch_s = batch_ms / 1000
        self.batch_events = batch_events
        self.give_up_s = give_up_s
        timeout = self._readers.connection_pool.connection_kwargs.get("socket_timeout")
        # A block the reader's socket would time out on is a failure, not a wait: keep it shorter.
        self._block_ms = BLOCK_MS if timeout is None else max(10, min(BLOCK_MS, int(timeout * 1000) - 50))
        self.append_script = redis.register_script(APPEND_LUA)
        self._final_script = redis.register_script(FINAL_LUA)
        self._read_script = self._readers.register_script(READ_LUA)
        self._writers: set[RedisEventWriter] = set()

    def key(self, task_id: str) -> str:
        return f"{self._prefix}:{task_id}"

    def writer(self, task_id: str) -> RedisEventWriter:
        writer = RedisEventWriter(self, task_id)
        self._writers.add(writer)
        return writer

    def forget(self, writer: RedisEventWriter) -> None:
        self._writers.discard(writer)

    def read(self, task_id: str, after: int = 0) -> EventReader:
        if after < 0:
            raise ValueError("after must be 0 or more")

        async def open_() -> AsyncIterator[LoggedEvent]:
            # One round trip: does the task exist, has it ended, and the first page.
            types: dict[bytes, str] = {}
            page = await self._page(task_id, after + 1, FIRST_PAGE, types)
            if page is None:
                raise UnknownTask(f"No events are stored for task {task_id}.")
            last_seq, ended, events = page
            if events and events[0].seq != after + 1:
                raise EventsGone(task_id, after, events[0].seq)
            if ended and last_seq <= after:
                return _nothing()
            return self._follow(task_id, after, events, more=len(events) == FIRST_PAGE, types=types)

        return EventReader(open_)

    async def _page(
        self, task_id: str, first_seq: int, count: int, types: dict[bytes, str]
    ) -> tuple[int, bool, list[LoggedEvent]] | None:
        """(the last seq, whether it is a terminal event, events from first_seq on); None: no stream."""
        answer = await self._read_script(keys=[self.key(task_id)], args=[first_seq, count])
        if not answer[0]:
            return None
        return int(answer[1]), bool(answer[2]), unpack_events(answer[3], types)

    async def append_final(self, task_id: str, event_type: str, make_data: Callable[[int], bytes]) -> int:
        if event_type not in TERMINAL_TYPES:
            raise ValueError(f"{event_type} is not a terminal event type")
        key = self.key(task_id)
        seen: int | str = ""
        data = b""
        while True:
            # The script appends only after the seq this event was built for: exactly one terminal
            # event, however many instances try at once (and a late write of the dead writer's).
            status, seq = await self._final_script(
                keys=[key], args=[seen, event_type, data, self.max_events, self.retention_ms]
            )
            if status == 1:
                return int(seq)
            if status == 0:
                return 0
            seen = int(seq)
            data = make_data(seen + 1)

    async def aclose(self) -> None:
        """Writers still open flush what they hold (within give_up_s), then stop; the clients stay open."""
        writers = list(self._writers)
        for writer in writers:
            writer.stop()
        flushers = [writer.flusher for writer in writers]
        if flushers:
            _, pending = await asyncio.wait(flushers, timeout=self.give_up_s + 1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _follow(
        self, task_id: str, after: int, events: list[LoggedEvent], *, more: bool, types: dict[bytes, str]
    ) -> AsyncIterator[LoggedEvent]:
        key = self.key(task_id)
        next_seq = after + 1
        failing_since: float | None = None
        attempt = 0
        while True:
            for item in events:
                if item.seq != next_seq:
                    # Entries are dense unless a bound dropped some: MAXLEN, a batch the writer gave
                    # up on, a Redis restart without persistence.
                    raise EventsGone(task_id, next_seq - 1, item.seq)
                yield item
                if item.type in TERMINAL_TYPES:
                    return
                next_seq += 1
            try:
                if more:
                    page = await self._page(task_id, next_seq, PAGE, types)
                    if page is None:
                        raise UnknownTask(f"The events of task {task_id} expired before it ended.")
                    events = page[2]
                    more = len(events) == PAGE
                    failing_since, attempt = None, 0
                    if events:
                        continue
                # Caught up: wait for the next entry (`<seq>-1` also skips OPEN_ID); the rest of its
                # batch is read as a page, which parses far faster than XREAD's answer.
                answer: Any = await self._readers.xread({key: f"{next_seq - 1}-1"}, count=1, block=self._block_ms)
                failing_since, attempt = None, 0
                entries = _xread_entries(answer)
                if entries:
                    entry_id, fields = entries[0]
                    raw_type = fields[b"t"]
                    kind = types.get(raw_type) or types.setdefault(raw_type, raw_type.decode())
                    events = [LoggedEvent(int(entry_id.partition(b"-")[0]), kind, fields[b"d"])]
                    more = kind not in TERMINAL_TYPES
                elif not await self._readers.exists(key):
                    raise UnknownTask(f"The events of task {task_id} expired before it ended.")
                else:
                    events = []
            except (RedisError, OSError):
                # Resume from next_seq once Redis answers again: nothing is skipped or read twice.
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.give_up_s:
                    raise
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                events, more = [], True


def _batch_length(pending: list[LoggedEvent]) -> int:
    """How many of the pending events go in the next script call (at least one)."""
    size = 0
    for index, item in enumerate(pending[:MAX_BATCH]):
        size += len(item.data)
        if size > MAX_BATCH_BYTES:
            return max(1, index)
    return min(len(pending), MAX_BATCH)


def _xread_entries(answer: Any) -> list[Any]:
    """The entries of a one-stream XREAD: RESP2 answers [[key, entries]], RESP3 {key: [entries]}."""
    if not answer:
        return []
    entries: list[Any] = answer[0][1] if isinstance(answer, list) else next(iter(answer.values()))[0]
    return entries


async def _nothing() -> AsyncIterator[LoggedEvent]:
    return
    yield  # an async generator that ends at once


class RedisEventWriter:
    """Buffers events and sends them by a flusher task of its own, one script call (one round trip) a batch.

    A batch goes when it holds batch_events events, when its first event has waited batch_ms, or at
    once for the terminal event. A batch Redis does not take is retried with backoff; once Redis has
    failed for give_up_s it is dropped (logged once per outage), and its readers get EventsGone.
    """

    __slots__ = (
        "_closing",
        "_ended_elsewhere",
        "_failing_since",
        "_first_at",
        "_ignore",
        "_in_flight_through",
        "_key",
        "_log",
        "_losing",
        "_next_seq",
        "_opened",
        "_pending",
        "_retry_at",
        "_sent",
        "_sent_through",
        "_stopping",
        "_urgent",
        "_waiter",
        "_wake_at",
        "dropped",
        "flusher",
        "task_id",
    )

    def __init__(self, log: RedisEventLog, task_id: str) -> None:
        self._log = log
        self.task_id = task_id
        self._key = log.key(task_id)
        self._pending: list[LoggedEvent] = []
        self._next_seq = 1
        self._first_at = 0.0  # when the oldest pending event was added
        self._urgent = False  # send without waiting for the batch to fill: a terminal event or a flush()
        # Set once nothing more is stored: a terminal event was added, the stream was finalised by
        # another instance (this writer was taken for dead), or the flusher has stopped.
        self._ignore = False
        self._ended_elsewhere = False
        self._closing = False
        self._stopping = False
        self._opened = False  # the stream exists (OPEN_ID written or events stored)
        # The flusher waits on this future; add() resolves it once `_wake_at` events are pending.
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = _NOBODY_WAITS
        # Seqs up to _sent_through were sent (or dropped); the batch in flight ends at _in_flight_through.
        # The open entry counts as seq 0.
        self._sent_through = -1
        self._in_flight_through = 0
        self._sent: asyncio.Event | None = None  # set (and replaced) after each send, for flush()
        self._failing_since: float | None = None
        self._retry_at = 0.0
        self._losing = False  # events were dropped in this outage (logged once)
        self.dropped = 0  # events this writer let go of: Redis down past give_up_s, or the buffer full
        self.flusher = asyncio.get_running_loop().create_task(self._run(), name=f"event-log-writer:{task_id}")

    def add(self, event: LoggedEvent) -> None:
        if self._closing:
            raise RuntimeError(f"task {self.task_id}: event added after its writer was closed")
        if event.seq != self._next_seq:
            raise ValueError(f"task {self.task_id}: event seq {event.seq} added, {self._next_seq} expected")
        self._next_seq += 1
        if self._ignore:
            return
        terminal = event.type in TERMINAL_TYPES
        log = self._log
        log.buffered += len(event.data)
        if log.buffered > log.max_buffered and not terminal:
            # Bounded memory while Redis is slow or down: the newest event goes, the terminal one never.
            log.buffered -= len(event.data)
            self._drop(1, event.seq, "the buffer of unwritten events is full")
            return
        pending = self._pending
        if not pending:
            self._first_at = time.monotonic()
        pending.append(event)
        if terminal:
            self._ignore = self._urgent = True
            self._wake()
        elif len(pending) >= self._wake_at:
            self._wake()

    async def flush(self) -> None:
        """Waits until what was added so far was sent (or dropped), the stream's open entry first."""
        target = self._pending[-1].seq if self._pending else self._in_flight_through
        while self._sent_through < target and not self.flusher.done():
            if self._pending:
                self._urgent = True
                self._wake()
            if self._sent is None:
                self._sent = asyncio.Event()
            await self._sent.wait()

    async def close(self) -> None:
        self._closing = True
        self._wake()
        # Shielded: a caller cancelled while waiting must not cancel the flush itself.
        await asyncio.shield(self.flusher)

    def stop(self) -> None:
        """Flush and stop without ending the task (shutdown): its retention clock does not start."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, wake_at: int, within: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_at = wake_at
        timer = None if within is None else loop.call_later(within, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            self._wake_at = _NOBODY_WAITS
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        log = self._log
        retention_set = False
        try:
            await self._send([], retention=False)
            while not self._ended_elsewhere:
                done = self._closing or self._stopping
                if not self._pending:
                    if done:
                        break
                    await self._wait(1, None)
                    continue
                waited = time.monotonic() - self._first_at
                if not (done or self._urgent) and len(self._pending) < log.batch_events and waited < log.batch_s:
                    await self._wait(log.batch_events, log.batch_s - waited)
                    continue
                count = _batch_length(self._pending)
                batch = self._pending[:count]
                del self._pending[:count]
                self._in_flight_through = batch[-1].seq
                if self._pending:
                    self._first_at = time.monotonic()
                else:
                    self._urgent = False
                # The task has ended once its terminal event is stored: retention starts then.
                retention = batch[-1].type in TERMINAL_TYPES or (self._closing and not self._pending)
                await self._send(batch, retention=retention)
                retention_set = retention_set or retention
            if self._closing and not retention_set and not self._ended_elsewhere:
                await self._send([], retention=True)
        finally:
            self._ignore = True
            if self._pending:
                log.buffered -= sum(len(event.data) for event in self._pending)
                self.dropped += len(self._pending)
                self._pending.clear()
            log.forget(self)
            self._signal_sent()

    async def _send(self, batch: list[LoggedEvent], *, retention: bool) -> None:
        log = self._log
        ttl = log.retention_ms if retention else log.running_ttl_ms
        args = [log.max_events, ttl, "0" if self._opened else "1", pack_events(batch)]
        try:
            answer = await self._call(args, batch)
        finally:
            log.buffered -= sum(len(event.data) for event in batch)
            self._sent_through = batch[-1].seq if batch else max(self._sent_through, 0)
            self._signal_sent()
        if answer is None:
            return
        self._opened = True
        refused_from = int(answer[2])
        if refused_from:
            self._ended_elsewhere = self._ignore = True
            self.dropped += sum(1 for item in batch if item.seq >= refused_from)  # the flusher drops the rest
            logger.warning(
                "task %s: its event log was ended by another instance (at seq %d); this writer's events"
                " from seq %d are not stored",
                self.task_id,
                int(answer[1]),
                refused_from,
            )

    async def _call(self, args: list[int | str | bytes], batch: list[LoggedEvent]) -> list[int] | None:
        """The script's answer; None if Redis had failed for give_up_s and the batch was dropped."""
        log = self._log
        attempt = 0
        while True:
            delay = self._retry_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # Redis was given up on: try again no more than once a RETRY_MAX_S
            try:
                answer: list[int] = await log.append_script(keys=[self._key], args=args)
            except (RedisError, OSError) as error:
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                if now - self._failing_since < log.give_up_s:
                    await asyncio.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                self._retry_at = now + RETRY_MAX_S
                if batch:
                    self._drop(len(batch), batch[0].seq, f"Redis failed for {log.give_up_s:g} s or more ({error})")
                return None
            if self._failing_since is not None:
                if self._losing:
                    logger.info("task %s: Redis takes its events again (%d dropped)", self.task_id, self.dropped)
                self._failing_since = None
                self._retry_at = 0.0
                self._losing = False
            return answer

    def _signal_sent(self) -> None:
        sent = self._sent
        if sent is not None:
            self._sent = None
            sent.set()

    def _drop(self, count: int, first_seq: int, reason: str) -> None:
        self.dropped += count
        if not self._losing:
            self._losing = True
            logger.warning(
                "task %s: dropping its events from seq %d (%s); their readers get EventsGone",
                self.task_id,
                first_seq,
                reason,
            )


_NOBODY_WAITS = 1 << 62
