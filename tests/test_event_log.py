"""Task event logs, in memory and on a real Redis: replay, live reads, resumes, bounds, retention and faults."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import shutil
import signal
import statistics
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.enforcement.redis_limiter import build_redis
from app.tasks.events import (
    EventLog,
    EventReader,
    EventsGone,
    LoggedEvent,
    MemoryEventLog,
    RedisEventLog,
    UnknownTask,
    build_reader_redis,
)
from tests.support import IN_CI, ManagedProcess, free_port, port_open, require_service

REDIS_URL = "redis://127.0.0.1:6379/0"
LOGGER = "app.tasks.events.redis_streams"


def event(task_id: str, seq: int, kind: str = "token.delta") -> LoggedEvent:
    body: dict[str, Any] = {"type": kind, "task_id": task_id, "seq": seq}
    if kind == "token.delta":
        body["delta"] = f"token {seq} "
    elif kind == "task.failed":
        body.update(code="worker_lost", detail="The task's instance stopped.", retryable=True, status=503)
    # As the task service makes them: exactly their length (orjson's bytes keep a 4 KiB buffer each).
    return LoggedEvent(seq, kind, memoryview(orjson.dumps(body)).tobytes())


def task_events(task_id: str, count: int, final: str = "task.completed") -> list[LoggedEvent]:
    """task.started, tokens, then the terminal event: `count` events in all."""
    kinds = ["task.started", *["token.delta"] * (count - 2), final]
    return [event(task_id, seq, kind) for seq, kind in enumerate(kinds, start=1)]


def new_task_id() -> str:
    return "task_" + uuid.uuid4().hex


async def collect(reader: EventReader, limit: int | None = None) -> list[LoggedEvent]:
    got: list[LoggedEvent] = []
    try:
        async for item in reader:
            got.append(item)
            if limit is not None and len(got) >= limit:
                break
    finally:
        await reader.aclose()
    return got


async def drain_into(reader: EventReader, got: list[LoggedEvent]) -> None:
    async for item in reader:
        got.append(item)


def seqs(events: list[LoggedEvent]) -> list[int]:
    return [e.seq for e in events]


def patient_client(url: str) -> Redis:
    # The shared Redis of a busy CI machine: patient timeouts, so that these tests are about the log.
    return Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=256, timeout=30))


@asynccontextmanager
async def shared_redis() -> AsyncIterator[tuple[Redis, Redis, str]]:
    """Two clients (two instances) on the shared Redis, a key prefix of this test's, removed afterwards."""
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"pacemaker-test:events:{uuid.uuid4().hex}"
    first, second = patient_client(REDIS_URL), patient_client(REDIS_URL)
    try:
        yield first, second, prefix
    finally:
        keys = [key async for key in first.scan_iter(match=f"{prefix}:*")]
        if keys:
            await first.delete(*keys)
        await first.aclose()
        await second.aclose()


@pytest.fixture
async def redis_pair() -> AsyncIterator[tuple[Redis, Redis, str]]:
    async with shared_redis() as pair:
        yield pair


@dataclass
class Logs:
    """The writer's log and another instance's (the same one in memory), through which tests read."""

    name: str
    log: EventLog
    other: EventLog
    make: Callable[..., EventLog]  # one more log of this backend, with other settings


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Logs]:
    if request.param == "memory":
        memories: list[MemoryEventLog] = []

        def make_memory(**settings: Any) -> MemoryEventLog:
            memories.append(MemoryEventLog(**{"max_bytes": 16 * 1024 * 1024, "retention_s": 60, **settings}))
            return memories[-1]

        log = make_memory()
        yield Logs("memory", log, log, make_memory)
        for memory in memories:
            await memory.aclose()
        return
    async with shared_redis() as (first, second, prefix):
        made: list[RedisEventLog] = []

        def make(client: Redis = first, **settings: Any) -> RedisEventLog:
            made.append(RedisEventLog(client, prefix=prefix, retention_s=60, batch_ms=10, batch_events=16, **settings))
            return made[-1]

        yield Logs("redis", make(), make(second), make)
        for log in made:
            await log.aclose()


async def write_all(log: EventLog, events: list[LoggedEvent], task_id: str, *, close: bool = True) -> None:
    writer = log.writer(task_id)
    for item in events:
        writer.add(item)
    await (writer.close() if close else writer.flush())


async def write_paced(log: EventLog, task_id: str, events: list[LoggedEvent], every_s: float) -> None:
    writer = log.writer(task_id)
    await writer.flush()
    for item in events:
        writer.add(item)
        if random.random() < 0.3:
            await asyncio.sleep(every_s)
    await writer.close()


# Replay and live reads, through both backends.


async def test_replay_from_the_start_the_middle_and_the_end(backend: Logs) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    events = task_events(task_id, 50)
    await write_all(log, events, task_id)
    assert await collect(other.read(task_id)) == events  # the same bytes, never re-encoded
    assert await collect(other.read(task_id, after=20)) == events[20:]
    assert await collect(other.read(task_id, after=49)) == events[49:]
    assert await collect(other.read(task_id, after=50)) == []
    assert await collect(other.read(task_id, after=80)) == []


async def test_a_reader_that_starts_before_the_first_event_gets_every_event(
    backend: Logs,
) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    writer = log.writer(task_id)
    await writer.flush()  # from here on the task is known to readers anywhere
    reader = other.read(task_id)
    await asyncio.wait_for(reader.start(), 2)  # known, and nothing to wait for: returns at once
    reading = asyncio.create_task(collect(reader))
    await asyncio.sleep(0.05)
    events = task_events(task_id, 40)
    for item in events:
        writer.add(item)
        await asyncio.sleep(0.001)
    await writer.close()
    assert await asyncio.wait_for(reading, 10) == events


async def test_many_concurrent_readers_see_every_event_in_order(backend: Logs) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    events = task_events(task_id, 600)
    writing = asyncio.create_task(write_paced(log, task_id, events, 0.002))
    await asyncio.sleep(0.02)
    readers = []
    for _ in range(30):
        readers.append(asyncio.create_task(collect(other.read(task_id, after=0))))
        await asyncio.sleep(random.uniform(0, 0.02))
    await writing
    for got in await asyncio.wait_for(asyncio.gather(*readers), 20):
        assert seqs(got) == list(range(1, 601))
        assert got == events


async def test_a_reader_reconnecting_at_random_points_sees_each_event_exactly_once(
    backend: Logs,
) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    events = task_events(task_id, 800)
    writing = asyncio.create_task(write_paced(log, task_id, events, 0.001))
    await asyncio.sleep(0.01)
    seen: list[LoggedEvent] = []
    reconnects = 0
    while not seen or seen[-1].type != "task.completed":
        # A client that drops after a few events and comes back with Last-Event-ID.
        seen += await collect(other.read(task_id, after=seen[-1].seq if seen else 0), limit=random.randint(1, 60))
        reconnects += 1
        await asyncio.sleep(random.choice((0, 0, 0.003)))
    await writing
    assert seen == events
    assert reconnects > 10


async def test_the_terminal_event_ends_every_reader_live_and_replayed(backend: Logs) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    writer = log.writer(task_id)
    await writer.flush()
    live = [asyncio.create_task(collect(other.read(task_id))) for _ in range(5)]
    events = task_events(task_id, 10, final="task.failed")
    for item in events:
        writer.add(item)
    await writer.close()
    for got in await asyncio.wait_for(asyncio.gather(*live), 10):
        assert got == events
    assert await asyncio.wait_for(collect(other.read(task_id, after=3)), 5) == events[3:]


async def test_append_final_appends_exactly_one_terminal_event_under_concurrency(
    backend: Logs,
) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    dead = log.writer(task_id)  # its instance dies: never closed
    started = task_events(task_id, 12)[:-1]
    for item in started:
        dead.add(item)
    await dead.flush()
    follower = asyncio.create_task(collect(other.read(task_id, after=5)))

    def make_data(seq: int) -> bytes:
        return event(task_id, seq, "task.failed").data

    answers = await asyncio.gather(
        *(instance.append_final(task_id, "task.failed", make_data) for instance in (log, other) * 5)
    )
    assert sorted(answers) == [0] * 9 + [12]
    final = event(task_id, 12, "task.failed")
    assert await asyncio.wait_for(follower, 5) == [*started[5:], final]
    assert await other.append_final(task_id, "task.failed", make_data) == 0
    # The writer was only slow: what it adds now is not stored after the terminal event.
    dead.add(event(task_id, 12, "task.completed"))
    await dead.close()
    assert await collect(other.read(task_id)) == [*started, final]


async def test_append_final_builds_its_event_again_if_the_log_moved_on_meanwhile(backend: Logs) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    dead = log.writer(task_id)
    for item in task_events(task_id, 4)[:-1]:
        dead.add(item)
    await dead.flush()
    late = event(task_id, 4)
    built: list[int] = []

    def make_data(seq: int) -> bytes:
        if not built:
            # The writer taken for dead stores one more event between the check and the append.
            if isinstance(log, RedisEventLog):
                with SyncRedis.from_url(REDIS_URL) as sync:
                    sync.xadd(log.key(task_id), {"t": late.type, "d": late.data}, id=f"{late.seq}-0")
            else:
                dead.add(late)
        built.append(seq)
        return event(task_id, seq, "task.failed").data

    assert await other.append_final(task_id, "task.failed", make_data) == 5
    assert built == [4, 5]
    stored = await collect(other.read(task_id, after=3))
    assert stored == [late, event(task_id, 5, "task.failed")]


async def test_append_final_after_a_completed_task_is_a_no_op(backend: Logs) -> None:
    log, other = backend.log, backend.other
    task_id = new_task_id()
    events = task_events(task_id, 5)
    await write_all(log, events, task_id)
    assert await other.append_final(task_id, "task.failed", lambda seq: b"{}") == 0
    assert await collect(other.read(task_id)) == events


async def test_an_unknown_task_is_refused_before_any_wait(backend: Logs) -> None:
    other = backend.other
    reader = other.read(new_task_id())
    with pytest.raises(UnknownTask):
        await asyncio.wait_for(reader.start(), 2)
    with pytest.raises(UnknownTask):
        await collect(other.read(new_task_id(), after=3))


async def test_events_must_come_in_seq_order(backend: Logs) -> None:
    log = backend.log
    task_id = new_task_id()
    writer = log.writer(task_id)
    writer.add(event(task_id, 1, "task.started"))
    with pytest.raises(ValueError, match="seq 3 added, 2 expected"):
        writer.add(event(task_id, 3))
    writer.add(event(task_id, 2, "task.completed"))
    await writer.close()


async def test_events_dropped_by_the_per_task_cap_are_gone_not_skipped(backend: Logs) -> None:
    task_id = new_task_id()
    log = other = backend.make(max_events_per_task=10)
    events = task_events(task_id, 300)
    await write_all(log, events, task_id)
    reader = other.read(task_id)
    with pytest.raises(EventsGone) as gone:
        await reader.start()
    oldest = gone.value.oldest
    # Exactly 291 in memory; MAXLEN ~ trims whole nodes of 100 entries, keeping at least 10.
    assert oldest == 291 if backend.name == "memory" else 101 <= oldest <= 291
    assert await collect(other.read(task_id, after=oldest - 1)) == events[oldest - 1 :]
    with pytest.raises(EventsGone):
        await collect(other.read(task_id, after=oldest - 2))


# Memory: bounds and retention.


async def test_memory_evicts_the_oldest_finished_task_first_when_over_its_bytes() -> None:
    log = MemoryEventLog(max_bytes=80 * 1024, retention_s=60)
    finished = [new_task_id() for _ in range(3)]
    for task_id in finished:
        await write_all(log, task_events(task_id, 100), task_id)  # about 23 KiB each
    assert 60 * 1024 < log.stored_bytes <= 80 * 1024
    running = new_task_id()
    writer = log.writer(running)
    for item in task_events(running, 100)[:-1]:
        writer.add(item)
        assert log.stored_bytes <= 80 * 1024
    with pytest.raises(UnknownTask):
        await collect(log.read(finished[0]))
    for kept in finished[1:]:
        assert len(await collect(log.read(kept))) == 100
    assert seqs(await collect(log.read(running), limit=99)) == list(range(1, 100))


async def test_memory_running_tasks_over_the_bytes_give_up_their_own_oldest_events() -> None:
    log = MemoryEventLog(max_bytes=32 * 1024)
    task_id = new_task_id()
    writer = log.writer(task_id)
    events = task_events(task_id, 1000)
    for item in events[:-1]:
        writer.add(item)
    assert log.stored_bytes <= 32 * 1024
    with pytest.raises(EventsGone) as gone:
        await log.read(task_id).start()
    follower = asyncio.create_task(collect(log.read(task_id, after=gone.value.oldest - 1)))
    await asyncio.sleep(0)
    writer.add(events[-1])
    await writer.close()
    got = await asyncio.wait_for(follower, 2)
    assert got == events[gone.value.oldest - 1 :] and got[-1].type == "task.completed"


async def test_memory_a_reader_whose_task_is_evicted_mid_replay_gets_events_gone() -> None:
    log = MemoryEventLog(max_bytes=40 * 1024)
    first = new_task_id()
    await write_all(log, task_events(first, 100), first)
    reader = log.read(first)
    got = [await reader.__anext__() for _ in range(10)]
    second = new_task_id()
    await write_all(log, task_events(second, 200), second)  # pushes the first task out
    with pytest.raises(EventsGone):
        await drain_into(reader, got)
    assert seqs(got) == list(range(1, len(got) + 1))


async def test_memory_finished_tasks_expire_after_retention_without_any_other_activity() -> None:
    log = MemoryEventLog(retention_s=0.2)
    task_id = new_task_id()
    await write_all(log, task_events(task_id, 20), task_id)
    assert len(await collect(log.read(task_id))) == 20
    await asyncio.sleep(0.35)
    assert log.stored_bytes == 0  # the sweep timer let go of it
    with pytest.raises(UnknownTask):
        await log.read(task_id).start()
    await log.aclose()


async def test_memory_bytes_count_what_the_stored_events_really_take() -> None:
    log = MemoryEventLog()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            task_id = new_task_id()
            writer = log.writer(task_id)
            for seq in range(1, 3001):  # made here, as the task service makes them, and held by the log only
                writer.add(event(task_id, seq, "task.completed" if seq == 3000 else "token.delta"))
            await writer.close()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # max_bytes bounds what the stored events really take, within a tenth.
    assert 0.9 * log.stored_bytes <= held <= 1.1 * log.stored_bytes, (held, log.stored_bytes)


# Redis: retention, MAXLEN, batching and latency.


async def test_redis_stream_expires_retention_after_close_and_has_a_long_ttl_while_running(
    redis_pair: tuple[Redis, Redis, str],
) -> None:
    client, _, prefix = redis_pair
    log = RedisEventLog(client, prefix=prefix, retention_s=30)
    task_id = new_task_id()
    key = log.key(task_id)
    writer = log.writer(task_id)
    events = task_events(task_id, 10)
    for item in events[:-1]:
        writer.add(item)
    await writer.flush()
    assert await client.ttl(key) > 80_000  # running: a day past the last write (a dead writer leaks nothing)
    writer.add(events[-1])
    await writer.close()
    assert 28_000 <= await client.pttl(key) <= 30_000
    ids = [entry_id for entry_id, _ in await client.xrange(key)]
    assert ids == [b"0-1", *(f"{seq}-0".encode() for seq in range(1, 11))]
    final = new_task_id()
    assert await log.append_final(final, "task.failed", lambda seq: event(final, seq, "task.failed").data) == 1
    assert 28_000 <= await client.pttl(log.key(final)) <= 30_000


async def test_redis_maxlen_bounds_a_running_tasks_stream(redis_pair: tuple[Redis, Redis, str]) -> None:
    client, _, prefix = redis_pair
    log = RedisEventLog(client, prefix=prefix, max_events_per_task=200)
    task_id = new_task_id()
    writer = log.writer(task_id)
    for item in task_events(task_id, 3000)[:-1]:
        writer.add(item)
    await writer.flush()
    length = await client.xlen(log.key(task_id))
    assert 200 <= length <= 400  # approximate trimming drops whole nodes of 100 entries


class CountingRedis(Redis):
    """Counts the commands sent, one round trip each (the log pipelines nothing on the write path)."""

    commands: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


async def test_redis_sends_one_script_call_per_batch(redis_pair: tuple[Redis, Redis, str]) -> None:
    _, _, prefix = redis_pair
    client = CountingRedis.from_pool(BlockingConnectionPool.from_url(REDIS_URL, max_connections=8, timeout=30))
    client.commands = []
    try:
        log = RedisEventLog(client, prefix=prefix, batch_ms=40, batch_events=32)
        task_id = new_task_id()
        events = task_events(task_id, 100)
        writer = log.writer(task_id)
        await writer.flush()
        client.commands.clear()
        for item in events[:32]:  # a full batch goes at once
            writer.add(item)
        await asyncio.sleep(0.015)
        assert len(client.commands) == 1
        for item in events[32:40]:  # a partial one waits for batch_ms
            writer.add(item)
        await asyncio.sleep(0.015)
        assert len(client.commands) == 1
        await asyncio.sleep(0.06)
        assert len(client.commands) == 2
        for item in events[40:]:  # 60 events, the terminal one last: sent together, at once
            writer.add(item)
        await asyncio.sleep(0.015)
        assert len(client.commands) == 3
        await writer.close()  # retention was set with the terminal event: no further round trip
        assert len(client.commands) == 3
        assert set(client.commands) <= {"EVALSHA", "EVAL", "SCRIPT LOAD", "SCRIPT"}
        stored = await client.xrange(log.key(task_id))
        assert [entry for entry, _ in stored][1:] == [f"{e.seq}-0".encode() for e in events]
    finally:
        await client.aclose()


class AnswerLostRedis(Redis):
    """Runs the first batch's script call, then fails as if the connection broke before its answer."""

    lost = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        answer = await super().execute_command(*args, **options)
        if str(args[0]).upper() == "EVALSHA" and args[-1] and not self.lost:
            self.lost += 1
            raise RedisConnectionError("connection lost after the command ran")
        return answer


async def test_redis_a_batch_whose_answer_was_lost_is_sent_again_and_stored_once(
    redis_pair: tuple[Redis, Redis, str],
) -> None:
    _, other, prefix = redis_pair
    client = AnswerLostRedis.from_pool(BlockingConnectionPool.from_url(REDIS_URL, max_connections=8, timeout=30))
    try:
        log = RedisEventLog(client, prefix=prefix)
        task_id = new_task_id()
        writer = log.writer(task_id)
        await writer.flush()
        events = task_events(task_id, 50)
        for item in events:
            writer.add(item)
        await writer.close()
        assert client.lost == 1 and writer.dropped == 0
        assert await collect(RedisEventLog(other, prefix=prefix).read(task_id)) == events
    finally:
        await client.aclose()


async def test_redis_splits_a_batch_of_large_events_so_that_no_call_holds_redis_long(
    redis_pair: tuple[Redis, Redis, str],
) -> None:
    _, _, prefix = redis_pair
    client = CountingRedis.from_pool(BlockingConnectionPool.from_url(REDIS_URL, max_connections=8, timeout=30))
    client.commands = []
    try:
        log = RedisEventLog(client, prefix=prefix)
        task_id = new_task_id()
        writer = log.writer(task_id)
        await writer.flush()
        client.commands.clear()
        big = [LoggedEvent(seq, "tool.result", b'{"result": "%s"}' % (b"x" * 400_000)) for seq in range(1, 9)]
        for item in [*big, event(task_id, 9, "task.completed")]:
            writer.add(item)
        await writer.close()
        assert len(client.commands) == 4  # 1 MiB a call: two 400 kB events each
        assert [entry for entry, _ in await client.xrange(log.key(task_id))][-1] == b"9-0"
    finally:
        await client.aclose()


async def test_redis_live_readers_on_another_client_get_events_within_the_batch_interval(
    redis_pair: tuple[Redis, Redis, str],
) -> None:
    first, second, prefix = redis_pair
    log = RedisEventLog(first, prefix=prefix, batch_ms=25)
    readers = RedisEventLog(second, prefix=prefix)
    task_id = new_task_id()
    writer = log.writer(task_id)
    await writer.flush()
    reader = readers.read(task_id)
    await reader.start()
    events = task_events(task_id, 21)
    latencies = []
    for item in events:
        await asyncio.sleep(0.03)
        added = time.monotonic()
        writer.add(item)
        got = await asyncio.wait_for(reader.__anext__(), 2)
        latencies.append(time.monotonic() - added)
        assert got == item
    await writer.close()
    await reader.aclose()
    # Each event waited for its batch (25 ms) then one round trip; a shared 2-core machine adds noise.
    assert statistics.median(latencies) < 0.045, latencies
    assert max(latencies) < 0.2, latencies


# Redis faults, on a redis-server of the test's own.


class OwnRedis:
    """A redis-server on a free port that a test may kill and start again; AOF fsynced on every write."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            if IN_CI:
                pytest.fail("redis-server is not installed (CI=true: a missing service is a failure)")
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: ManagedProcess | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        self.process = ManagedProcess(args, os.environ, self.workdir / f"redis-{time.monotonic_ns()}.log")
        self.process.wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGKILL)
            self.process = None
        while port_open("127.0.0.1", self.port):
            time.sleep(0.01)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


async def restart_later(server: OwnRedis, down_s: float) -> None:
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(server.start)


async def test_a_redis_restart_mid_task_loses_nothing_and_the_writer_recovers(own_redis: OwnRedis) -> None:
    client, reader_client = build_redis(own_redis.url), build_reader_redis(own_redis.url)
    try:
        log = RedisEventLog(client, readers=reader_client, batch_ms=5)
        task_id = new_task_id()
        writer = log.writer(task_id)
        await writer.flush()
        follower = asyncio.create_task(collect(log.read(task_id)))
        events = task_events(task_id, 400)
        add_times = []
        for index, item in enumerate(events):
            if index == 150:
                restart = asyncio.create_task(restart_later(own_redis, 0.5))
            started = time.perf_counter()
            writer.add(item)
            add_times.append(time.perf_counter() - started)
            await asyncio.sleep(0.004)
        await restart
        await asyncio.wait_for(writer.close(), 15)
        assert writer.dropped == 0
        assert await asyncio.wait_for(follower, 15) == events  # the live reader resumed across the restart
        assert await collect(log.read(task_id)) == events
        assert max(add_times) < 0.005  # add() never waited on Redis, up or down
    finally:
        await client.aclose()
        await reader_client.aclose()


async def test_redis_down_past_the_bound_drops_the_batch_logs_once_and_readers_get_events_gone(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = build_redis(own_redis.url)
    try:
        log = RedisEventLog(client, batch_ms=5, give_up_s=0.5)
        task_id = new_task_id()
        writer = log.writer(task_id)
        events = task_events(task_id, 300)
        for item in events[:100]:
            writer.add(item)
        await writer.flush()
        await asyncio.to_thread(own_redis.kill)
        for item in events[100:200]:  # Redis is down for longer than give_up_s: these are lost
            writer.add(item)
            await asyncio.sleep(0.012)
        await asyncio.to_thread(own_redis.start)
        await asyncio.sleep(1.2)  # the writer tries again within RETRY_MAX_S
        for item in events[200:]:
            writer.add(item)
        await asyncio.wait_for(writer.close(), 10)
        assert 0 < writer.dropped <= 100
        dropping = [r for r in caplog.records if r.levelno == logging.WARNING and "dropping" in r.getMessage()]
        assert len(dropping) == 1 and task_id in dropping[0].getMessage()
        stored = await collect_until_gone(log.read(task_id))
        assert seqs(stored) == list(range(1, 101))  # everything before the gap, then EventsGone
        with pytest.raises(EventsGone) as gone:
            await log.read(task_id, after=100).start()
        resumed = await collect(log.read(task_id, after=gone.value.oldest - 1))
        assert resumed == events[gone.value.oldest - 1 :] and resumed[-1].type == "task.completed"
        assert gone.value.oldest - 1 - 100 == writer.dropped
    finally:
        await client.aclose()


async def collect_until_gone(reader: EventReader) -> list[LoggedEvent]:
    got: list[LoggedEvent] = []
    with pytest.raises(EventsGone):
        await drain_into(reader, got)
    return got


async def test_redis_unwritten_events_are_bounded_in_bytes_while_redis_is_down(own_redis: OwnRedis) -> None:
    client = build_redis(own_redis.url)
    try:
        log = RedisEventLog(client, max_bytes=16 * 1024, give_up_s=30)
        task_id = new_task_id()
        writer = log.writer(task_id)
        await writer.flush()
        await asyncio.to_thread(own_redis.kill)
        events = task_events(task_id, 2000)
        started = time.perf_counter()
        for item in events:
            writer.add(item)
        elapsed = time.perf_counter() - started
        assert log.buffered <= 16 * 1024 + len(events[-1].data)  # the terminal event is never dropped
        assert writer.dropped > 1000
        assert elapsed < 0.5  # 2000 add() calls never waited on the dead Redis
        await asyncio.to_thread(own_redis.start)
        await asyncio.wait_for(writer.close(), 15)
        assert log.buffered == 0
        stored = await client.xrange(log.key(task_id))
        assert stored[-1][1][b"t"] == b"task.completed"
    finally:
        await client.aclose()
