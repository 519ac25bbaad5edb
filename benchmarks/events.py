"""Benchmark the task event logs: add() throughput, memory and Redis, and resume latency on both.

    .venv/bin/python -m benchmarks.events [--events 200000] [--tasks 50] [--resumes 1000] [--live 300] [--smoke]

Memory: one task of --events token events (past the per-task cap of 100,000, so trimming runs
too), then --tasks tasks written round-robin, as the runner interleaves them; add() is timed alone.
Redis (127.0.0.1:6379, keys under a prefix of this run's, deleted at the end): the same on the
production client (app.enforcement.redis_limiter.build_redis), timed from the first add() until
every writer's close() returned, i.e. until Redis holds every event; add() is also timed alone.
Resume: a finished task of 10,000 events; --resumes times read(after=random) -> the first replayed
event, on the writer's instance and (Redis) on another client. Live: on Redis, add() -> the event
at a reader on another client, one event every 10 ms.

--smoke takes a few seconds (small counts) and exits 1 unless every reader got exactly what was
written. Stdout is markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
import uuid
from typing import Any

import orjson

from app.enforcement.redis_limiter import build_redis
from app.tasks.events import EventLog, LoggedEvent, MemoryEventLog, RedisEventLog, build_reader_redis

REDIS_URL = "redis://127.0.0.1:6379/0"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compact_json(value: Any) -> bytes:
    # orjson's result keeps a 4 KiB buffer whatever its length (app/tasks/events/base.py): copied to its size.
    return memoryview(orjson.dumps(value)).tobytes()


def make_events(task_id: str, count: int) -> list[LoggedEvent]:
    events = [LoggedEvent(1, "task.started", compact_json({"type": "task.started", "task_id": task_id, "seq": 1}))]
    for seq in range(2, count):
        body = {"type": "token.delta", "task_id": task_id, "seq": seq, "delta": " word"}
        events.append(LoggedEvent(seq, "token.delta", compact_json(body)))
    final = {"type": "task.completed", "task_id": task_id, "seq": count, "output": "..."}
    events.append(LoggedEvent(count, "task.completed", compact_json(final)))
    return events


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def write_round_robin(event_log: EventLog, streams: dict[str, list[LoggedEvent]]) -> tuple[float, float]:
    """(seconds spent in add() alone, seconds until every writer closed)."""
    writers = {task_id: event_log.writer(task_id) for task_id in streams}
    for writer in writers.values():
        await writer.flush()
    in_add = 0.0
    started = time.perf_counter()
    longest = max(len(events) for events in streams.values())
    for start in range(0, longest, 64):
        # 64 events of each task, then the loop turns: the flushers run, as in a server.
        for task_id, writer in writers.items():
            chunk = streams[task_id][start : start + 64]
            t0 = time.perf_counter()
            for item in chunk:
                writer.add(item)
            in_add += time.perf_counter() - t0
        await asyncio.sleep(0)
    await asyncio.gather(*(writer.close() for writer in writers.values()))
    return in_add, time.perf_counter() - started


async def check(event_log: EventLog, streams: dict[str, list[LoggedEvent]], cap: int | None = None) -> bool:
    ok = True
    for task_id, events in list(streams.items())[:5]:
        expected = events if cap is None else events[-cap:]
        got = [item async for item in event_log.read(task_id, after=expected[0].seq - 1)]
        if got != expected:
            log(f"MISMATCH: {task_id} read {len(got)} events, wrote {len(expected)}")
            ok = False
    return ok


async def resume_latency(write_log: EventLog, read_log: EventLog, count: int, resumes: int) -> list[float]:
    task_id = "task_" + uuid.uuid4().hex
    events = make_events(task_id, count)
    writer = write_log.writer(task_id)
    for item in events:
        writer.add(item)
    await writer.close()
    latencies = []
    for _ in range(resumes):
        after = random.randrange(count - 1)
        started = time.perf_counter()
        reader = read_log.read(task_id, after=after)
        first = await reader.__anext__()
        latencies.append(time.perf_counter() - started)
        await reader.aclose()
        if first.seq != after + 1:
            raise AssertionError(f"resumed after {after} at {first.seq}")
    return latencies


async def live_latency(write_log: RedisEventLog, read_log: RedisEventLog, count: int) -> list[float]:
    task_id = "task_" + uuid.uuid4().hex
    events = make_events(task_id, count)
    writer = write_log.writer(task_id)
    await writer.flush()
    reader = read_log.read(task_id)
    await reader.start()
    latencies = []
    for item in events:
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        writer.add(item)
        got = await reader.__anext__()
        latencies.append(time.perf_counter() - started)
        if got != item:
            raise AssertionError(f"live reader got {got.seq}, expected {item.seq}")
    await writer.close()
    await reader.aclose()
    return latencies


def ms(values: list[float]) -> str:
    return f"{percentile(values, 0.5) * 1000:.3f} / {percentile(values, 0.99) * 1000:.3f}"


async def run(args: argparse.Namespace) -> int:
    ok = True
    rows: list[tuple[str, str, str]] = []

    memory = MemoryEventLog(max_bytes=512 * 1024 * 1024, max_events_per_task=100_000)
    one = {"task_big": make_events("task_big", args.events)}
    in_add, total = await write_round_robin(memory, one)
    rows.append(("memory, 1 task", f"{args.events / in_add:,.0f}", f"{args.events / total:,.0f}"))
    ok &= await check(memory, one, cap=min(args.events, 100_000))
    per_task = max(2, args.events // args.tasks)
    many = {f"task_{i}": make_events(f"task_{i}", per_task) for i in range(args.tasks)}
    in_add, total = await write_round_robin(memory, many)
    rows.append(
        (
            f"memory, {args.tasks} tasks",
            f"{per_task * args.tasks / in_add:,.0f}",
            f"{per_task * args.tasks / total:,.0f}",
        )
    )
    ok &= await check(memory, many)
    log("memory written")

    prefix = f"pacemaker-bench:events:{uuid.uuid4().hex}"
    client, other = build_redis(REDIS_URL), build_redis(REDIS_URL)
    readers, other_readers = build_reader_redis(REDIS_URL), build_reader_redis(REDIS_URL)
    redis_log = RedisEventLog(client, readers=readers, prefix=prefix, retention_s=300)
    other_log = RedisEventLog(other, readers=other_readers, prefix=prefix, retention_s=300)
    try:
        for label, streams in (
            ("1 task", {"task_one": make_events("task_one", args.events // 2)}),
            (f"{args.tasks} tasks", {f"task_r{i}": make_events(f"task_r{i}", per_task) for i in range(args.tasks)}),
        ):
            count = sum(len(events) for events in streams.values())
            in_add, total = await write_round_robin(redis_log, streams)
            rows.append((f"Redis, {label}", f"{count / in_add:,.0f}", f"{count / total:,.0f}"))
            ok &= await check(other_log, streams)
            log(f"Redis {label} written")

        resume_memory = await resume_latency(memory, memory, 10_000, args.resumes)
        resume_redis_same = await resume_latency(redis_log, redis_log, 10_000, args.resumes)
        resume_redis_other = await resume_latency(redis_log, other_log, 10_000, args.resumes)
        live = await live_latency(redis_log, other_log, args.live)
    finally:
        await redis_log.aclose()
        await other_log.aclose()
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
        for c in (client, other, readers, other_readers):
            await c.aclose()

    print(
        f"Event logs, {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs,"
        f" {'smoke run (figures mean nothing)' if args.smoke else 'full run'}; events of about 90 bytes of JSON.\n"
    )
    print("| writes | add() alone, events/s | end to end (stored), events/s |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    print("\n| latency, ms (p50 / p99) | |")
    print("|---|---|")
    print(f"| resume, memory: read() -> first replayed event | {ms(resume_memory)} |")
    print(f"| resume, Redis, same client | {ms(resume_redis_same)} |")
    print(f"| resume, Redis, another client | {ms(resume_redis_other)} |")
    print(f"| live, Redis: add() -> a reader on another client (batch_ms 25) | {ms(live)} |")
    if not ok:
        log("FAILED: a reader did not get exactly what was written")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--resumes", type=int, default=1000)
    parser.add_argument("--live", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: small counts, exit 1 on any mismatch")
    args: Any = parser.parse_args()
    if args.smoke:
        args.events, args.tasks, args.resumes, args.live = 5_000, 5, 50, 20
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
