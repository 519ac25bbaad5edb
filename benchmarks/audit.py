"""Benchmark the audit log: batched inserts into PostgreSQL, and the latency the audit path adds.

    .venv/bin/python -m benchmarks.audit [--rows 100000] [--seconds 10] [--warmup 2] [--parts a,b]

Part A (insert throughput, in this process). A fresh PostgreSQL database on the shared server
(127.0.0.1:5432, user postgres) is migrated with app.db.migrate, and an AuditSink is built as
app/lifespan.py builds it: AuditSink(create_engine(DatabaseSettings(url=...)), AuditSettings(...),
Metrics()). --rows rows, made the way the middleware makes them (AuditContext(...).row(), with
realistic values: routes, models, statuses, token counts, costs, user agents), are submitted by a
producer that keeps within the queue (queue_size as configured, default 20,000: a faster producer
would send rows to the spool, which is not what is measured). Throughput is rows / (first submit
until count(*) on audit_record says every row is in), for batch_size 500 and 2000; no row may reach
the spool. Then, to show where the time goes, the insert alone (no queue, one batch after another,
one transaction per batch) for three ways of writing a batch:

  sink._insert_rows     the app's path: SQLAlchemy Core insert().on_conflict_do_nothing(), executemany
  asyncpg executemany   one prepared INSERT ... ON CONFLICT (record_uid) DO NOTHING, executemany
  asyncpg unnest        one INSERT ... SELECT FROM unnest($1::varchar(32)[], ...) ON CONFLICT DO NOTHING

and an end-to-end run of a sink (defined here, not in app/) whose _insert_rows sends each batch as
that single unnest statement through the same SQLAlchemy engine: what changing the sink would buy.
Each figure comes with the CPU it cost: this process (the client side: SQLAlchemy, asyncpg encoding)
and the PostgreSQL backends of the benchmark's database (psutil, the server being local); what is
left of the wall time is waiting (round trips, WAL flush at commit). A cProfile of the app's insert
path closes the part. The table is truncated before every run, so that each starts alike.

Part B (added latency, end to end). Two more fresh, migrated databases and two `pacemaker serve`
configurations on them, identical but for audit.enabled (true / false); the simulated provider
streams without pacing, and the key's limits never bind (keys create --rpm 100000000 --tpm
2000000000 --max-concurrency 10000; a tpm of 10^12 does not fit api_key.tpm, an INTEGER column, on
PostgreSQL). The servers run one at a time, in the order off, on, off, on (two pairs, as the machine
is noisy), each started for its run and stopped after it. An open-loop load generator in this
process (aiohttp on uvloop) launches POST /v1/tasks {"query": ...} on a fixed 2 ms schedule (500
req/s) whatever the responses do, for --warmup then --seconds; latency is from a request's launch to
its last byte, for the requests scheduled in the measured window. Every request carries its own
x-request-id, so that after an audit-on run the rows can be matched one to one with the requests
the server answered (warm-up included): none missing, none twice. With two or more CPUs the server
is pinned to CPU 0 and this process to CPU 1 (--no-pin turns that off); PostgreSQL is the shared
server's and is not pinned.

Before measuring, the benchmark waits (polling every 20 s, at most 10 minutes) while another
`python -m benchmarks.*` runs on the machine (--no-wait skips that). Every child process is stopped
and every database dropped on every exit: normal, error, Ctrl-C, SIGTERM or SIGHUP.

Everything printed on stdout is markdown, ready for the README; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import math
import os
import platform
import pstats
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import sqlalchemy
import uvloop
import yaml
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from app.audit.context import AuditContext
from app.audit.models import AuditRecord
from app.audit.sink import AuditSink
from app.config import AuditSettings, DatabaseSettings
from app.db import create_engine, migrate
from app.observability.metrics import Metrics
from benchmarks.harness import HOST, ROOT, Child, clean_up, free_port, log, pin, terminate_on_sigterm

PG_HOSTPORT = "127.0.0.1:5432"
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOSTPORT}/test"
DB_PREFIX = "pacemaker_bench_audit_"
BATCH_SIZES = (500, 2000)
RATE = 500  # requests per second in part B
INTERVAL_S = 1 / RATE
QUERY = "Summarise the main risks of moving a billing service from MySQL to PostgreSQL, in a few sentences."
REQUEST_TIMEOUT_S = 10.0  # no request may hold a run longer than this
STOP_TIMEOUT_S = 45.0  # uvicorn's graceful shutdown (30 s) plus the audit flush
SERVER_CPU = 0  # when pinning: the server under test
LOAD_CPU = 1  # when pinning: this process (the load generator)
TARGET_ROWS_PER_S = 20_000
TARGET_ADDED_P50_MS = 0.5
WAIT_POLL_S = 20.0
WAIT_MAX_S = 600.0

_TABLE = AuditRecord.__table__  # type: ignore[attr-defined]
COLUMNS = [c.name for c in _TABLE.columns if c.name != "id"]
_PG_TYPES = {c.name: c.type.compile(dialect=postgresql.dialect()) for c in _TABLE.columns}
# Column names and types come from the app's own table definition, never from input.
EXECUTEMANY_SQL = (
    f"INSERT INTO audit_record ({', '.join(COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
    " ON CONFLICT (record_uid) DO NOTHING"
)
UNNEST_SQL = (
    f"INSERT INTO audit_record ({', '.join(COLUMNS)})"  # noqa: S608
    f" SELECT * FROM unnest({', '.join(f'${i}::{_PG_TYPES[c]}[]' for i, c in enumerate(COLUMNS, 1))})"
    " ON CONFLICT (record_uid) DO NOTHING"
)
# The same statement through SQLAlchemy (named binds; CAST because `:name::type` would not parse).
UNNEST_TEXT = text(
    f"INSERT INTO audit_record ({', '.join(COLUMNS)})"  # noqa: S608
    f" SELECT * FROM unnest({', '.join(f'CAST(:{c} AS {_PG_TYPES[c]}[])' for c in COLUMNS)})"
    " ON CONFLICT (record_uid) DO NOTHING"
)


def pg_url(name: str) -> str:
    return f"postgresql+asyncpg://postgres@{PG_HOSTPORT}/{name}"


def pg_dsn(name: str) -> str:
    return f"postgresql://postgres@{PG_HOSTPORT}/{name}"


# ---------------------------------------------------------------------------------------------
# Databases, processes, the machine


class Databases:
    """Fresh databases on the shared PostgreSQL server; drop_all() drops every one made."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self, label: str) -> str:
        """CREATE DATABASE and migrate it to head; returns its name. Call outside the event loop."""
        name = f"{DB_PREFIX}{label}_{secrets.token_hex(4)}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        migrate(pg_url(name))  # synchronous (Alembic runs its own event loop)
        return name

    def drop_all(self) -> None:
        while self.names:
            name = self.names.pop()
            try:
                asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as exc:  # keep dropping the others; say which one is left
                log(f"could not drop database {name}: {type(exc).__name__}: {exc}")


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def server_facts() -> dict[str, str]:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        facts = {"version": str(await connection.fetchval("SHOW server_version"))}
        for name in ("synchronous_commit", "fsync", "shared_buffers", "wal_level"):
            facts[name] = str(await connection.fetchval(f"SHOW {name}"))
        return facts
    finally:
        await connection.close()


def other_benchmarks() -> list[str]:
    """Command lines of `python -m benchmarks.*` processes other than this one (and its parents, children)."""
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.parents()} | {p.pid for p in me.children(recursive=True)}
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["pid"] in ours or not cmdline or not Path(cmdline[0]).name.startswith("python"):
            continue
        if any(a == "-m" and b.startswith("benchmarks.") for a, b in itertools.pairwise(cmdline)):
            found.append(f"{process.info['pid']}: {' '.join(cmdline)[:160]}")
    return found


def wait_for_quiet_machine() -> None:
    deadline = time.monotonic() + WAIT_MAX_S
    while busy := other_benchmarks():
        if time.monotonic() >= deadline:
            log(f"another benchmark still runs after {WAIT_MAX_S:.0f} s; measuring anyway (figures may suffer)")
            return
        log(f"waiting for another benchmark to finish (every {WAIT_POLL_S:.0f} s): {'; '.join(busy)}")
        time.sleep(WAIT_POLL_S)


def _busy(times: Any) -> float:
    total = times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return float(total + getattr(times, "steal", 0.0))


def postgres_cpu() -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL process on this machine, by pid."""
    seconds = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if process.info["name"] == "postgres" and times is not None:
            seconds[process.pid] = float(times.user + times.system)
    return seconds


@dataclass
class CpuWindow:
    """CPU used between start() and stop(): this process, PostgreSQL (all of it, and some pids), the machine."""

    me: float = 0.0
    pg_all: float = 0.0
    pg_ours: float = float("nan")
    machine: float = 0.0
    wall: float = 0.0
    _start: tuple[float, dict[int, float], float, float] | None = None

    def start(self) -> None:
        mine = psutil.Process().cpu_times()
        self._start = (mine.user + mine.system, postgres_cpu(), _busy(psutil.cpu_times()), time.perf_counter())

    def stop(self, our_pids: Sequence[int] = ()) -> None:
        assert self._start is not None
        me0, pg0, machine0, wall0 = self._start
        mine = psutil.Process().cpu_times()
        pg1 = postgres_cpu()
        self.wall = time.perf_counter() - wall0
        self.me = mine.user + mine.system - me0
        self.pg_all = sum(now - pg0.get(pid, 0.0) for pid, now in pg1.items())
        if our_pids:
            self.pg_ours = sum(pg1[pid] - pg0.get(pid, 0.0) for pid in our_pids if pid in pg1)
        self.machine = _busy(psutil.cpu_times()) - machine0


async def backend_pids(pg: asyncpg.Connection, database: str) -> list[int]:
    """The server processes working for one database (its client backends, autovacuum workers)."""
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    return [int(row["pid"]) for row in rows]


def new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop()  # as under `pacemaker serve`


# ---------------------------------------------------------------------------------------------
# Part A: insert throughput

_ROUTES = [  # (weight, route, transport)
    (55, "/v1/tasks", "json"),
    (15, "/v1/tasks", "sse"),
    (20, "/v1/chat/completions", "openai"),
    (5, "/v1/tools/{name}/invoke", "tool"),
    (5, "/v1/ws", "ws"),
]
_OUTCOMES = [  # (weight, status, error code, HTTP status)
    (91, None, None, 200),
    (4, None, "rate_limited", 429),
    (2, None, "upstream_error", 502),
    (1, None, "validation_error", 422),
    (1, "cancelled", "cancelled", 200),
    (1, None, "request_timeout", 504),
]
_TIERS = {"simple": ("small", "gpt-4o-mini"), "complex": ("medium", "gpt-4.1"), "research": ("large", "o3")}
_AGENTS = [
    "OpenAI/Python 1.54.4",
    "python-httpx/0.28.1",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "pacemaker-client/0.3 (+https://example.invalid/bot)",
    "curl/8.5.0",
]


def make_rows(n: int, seed: int = 7) -> tuple[list[dict[str, Any]], float]:
    """n audit rows as the middleware and the routes make them; and the µs one row() call took."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    rows = []
    row_seconds = 0.0
    for i in range(n):
        _, route, transport = rng.choices(_ROUTES, weights=[w for w, *_ in _ROUTES])[0]
        _, status, error_code, http_status = rng.choices(_OUTCOMES, weights=[w for w, *_ in _OUTCOMES])[0]
        mode = rng.choices(list(_TIERS), weights=[80, 15, 5])[0]
        tier, model = _TIERS[mode]
        context = AuditContext(
            request_id=secrets.token_hex(16),
            route=route,
            transport=transport,
            client_ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            user_agent=rng.choice(_AGENTS),
            created_at=now - timedelta(milliseconds=n - i),
            api_key_id=rng.randint(1, 200),
            status=status,
            error_code=error_code,
            http_status=http_status,
        )
        if http_status not in (422, 429):  # refused before the model call: no model, no spend
            context.task_id = f"task_{secrets.token_hex(8)}" if transport != "openai" else None
            context.mode, context.tier, context.model = mode, tier, model
            context.provider = "openai"
            context.prompt_tokens = rng.randint(30, 4000)
            context.completion_tokens = rng.randint(0, 1200)
            context.cost_usd = Decimal(context.prompt_tokens * 150 + context.completion_tokens * 600) / Decimal(10**9)
            context.ttft_ms = round(rng.uniform(80, 900), 3)
            context.tool_names = ["calculator"] * rng.choice([0, 0, 0, 1, 2])
            context.retries = rng.choice([0] * 20 + [1])
            context.usage_estimated = rng.random() < 0.03
        started = time.perf_counter()
        row = context.row()
        row_seconds += time.perf_counter() - started
        rows.append(row)
    return rows, row_seconds / n * 1e6


@dataclass
class InsertRun:
    part: str  # "sink" (queue + writer, end to end) or "insert" (insert path alone)
    method: str
    batch_size: int
    rows: int
    seconds: float
    cpu: CpuWindow
    batches: int = 0
    spooled: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")

    def per_row_us(self, seconds: float) -> float:
        return seconds / self.rows * 1e6 if self.rows else float("nan")

    @property
    def other_cpu(self) -> float:
        """Busy CPU seconds of the machine outside this process and PostgreSQL: noise."""
        return max(0.0, self.cpu.machine - self.cpu.me - self.cpu.pg_all)


def median_runs(runs: Sequence[InsertRun], part: str) -> list[tuple[InsertRun, list[float]]]:
    """Per (method, batch size), in first-seen order: the round with the median rows/s, and every round's."""
    groups: dict[tuple[str, int], list[InsertRun]] = {}
    for run in runs:
        if run.part == part:
            groups.setdefault((run.method, run.batch_size), []).append(run)
    chosen = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r.rows_per_s)
        chosen.append((ordered[(len(ordered) - 1) // 2], [r.rows_per_s for r in group]))
    return chosen


class UnnestSink(AuditSink):
    """The app's sink with one change, for this benchmark only: a batch is one INSERT ... SELECT FROM unnest."""

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._settings.write_timeout_s), self._engine.begin() as connection:
                await connection.execute(UNNEST_TEXT, columns_of(rows))
        except Exception as exc:
            log(f"unnest sink: write failed: {type(exc).__name__}: {exc}")
            self.database_ok = False
            return False
        self.database_ok = True
        self._metrics.audit_flush_seconds.observe(time.perf_counter() - started)
        self._metrics.audit_rows_written.inc(len(rows))
        return True


def columns_of(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    return {column: [row[column] for row in rows] for column in COLUMNS}


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def through_sink(
    database: str, rows: list[dict[str, Any]], batch_size: int, spool_dir: Path, sink_class: type[AuditSink]
) -> InsertRun:
    """Submit every row to a started sink (keeping within its queue); time until count(*) has them all."""
    settings = AuditSettings(batch_size=batch_size, spool_dir=spool_dir)
    engine = create_engine(DatabaseSettings(url=pg_url(database)))
    metrics = Metrics()
    sink = sink_class(engine, settings, metrics)
    pg = await asyncpg.connect(pg_dsn(database), timeout=10)
    n = len(rows)
    try:
        await pg.execute("TRUNCATE audit_record")
        async with engine.connect() as connection:  # a pooled connection ready, as in a running server
            await connection.execute(text("SELECT 1"))
        await sink.start()
        deadline = time.perf_counter() + max(120.0, n / 500)
        cpu = CpuWindow()
        cpu.start()
        started = time.perf_counter()

        async def produce() -> None:
            i = 0
            while i < n:
                room = settings.queue_size - sink.queue_depth
                if room <= 0:
                    if time.perf_counter() > deadline:
                        raise RuntimeError("the sink stopped taking rows")
                    await asyncio.sleep(0.001)
                    continue
                for row in rows[i : i + min(room, 1000)]:
                    sink.submit(row)
                i += min(room, 1000)
                await asyncio.sleep(0)  # the writer runs in the same loop, as in the server

        producer = asyncio.create_task(produce())
        last_count = 0.0
        while True:
            now = time.perf_counter()
            written = _sample(metrics, "pacemaker_audit_rows_written_total")
            if written >= n or now - last_count >= 0.1:
                last_count = now
                if await pg.fetchval("SELECT count(*) FROM audit_record") >= n:
                    break
            if producer.done() and producer.exception() is not None:
                raise RuntimeError(f"producer failed: {producer.exception()}")
            if _sample(metrics, "pacemaker_audit_rows_spooled_total") > 0:
                raise RuntimeError("rows went to the spool: the run does not measure the database")
            if now > deadline:
                raise RuntimeError(f"only {written:.0f} of {n} rows written within the time limit")
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - started
        cpu.stop(await backend_pids(pg, database))
        await producer
    finally:
        await sink.stop()
        await engine.dispose()
        await pg.close()
    return InsertRun(
        "sink",
        sink_class.__name__,
        batch_size,
        n,
        seconds,
        cpu,
        batches=int(_sample(metrics, "pacemaker_audit_flush_seconds_count")),
        spooled=int(_sample(metrics, "pacemaker_audit_rows_spooled_total")),
    )


async def insert_only(
    database: str,
    rows: list[dict[str, Any]],
    batch_size: int,
    method: str,
    spool_dir: Path,
    profiler: cProfile.Profile | None = None,
) -> InsertRun:
    """Write every row, batch after batch (one transaction each), by one method; no queue, no writer task."""
    engine = create_engine(DatabaseSettings(url=pg_url(database)))
    sink = AuditSink(engine, AuditSettings(batch_size=batch_size, spool_dir=spool_dir), Metrics())
    pg = await asyncpg.connect(pg_dsn(database), timeout=10)
    raw = await asyncpg.connect(pg_dsn(database), timeout=10)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    try:
        await pg.execute("TRUNCATE audit_record")
        write = await _writer(method, sink, raw)
        await write(batches[0][:1])  # connect, prepare: not part of the figure
        await pg.execute("TRUNCATE audit_record")
        cpu = CpuWindow()
        cpu.start()
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            for batch in batches:
                await write(batch)
        finally:
            if profiler is not None:
                profiler.disable()
        seconds = time.perf_counter() - started
        cpu.stop([*await backend_pids(pg, database)])
        count = await pg.fetchval("SELECT count(*) FROM audit_record")
        if count != len(rows):
            raise RuntimeError(f"{method}: {count} rows in the table, {len(rows)} written")
    finally:
        await raw.close()
        await engine.dispose()
        await pg.close()
    return InsertRun("insert", method, batch_size, len(rows), seconds, cpu, batches=len(batches))


async def _writer(
    method: str, sink: AuditSink, raw: asyncpg.Connection
) -> Callable[[list[dict[str, Any]]], Awaitable[None]]:
    if method == "sink._insert_rows":

        async def via_sink(batch: list[dict[str, Any]]) -> None:
            if not await sink._insert_rows(batch):
                raise RuntimeError("sink._insert_rows failed (see the log)")

        return via_sink
    if method == "asyncpg executemany":

        async def executemany(batch: list[dict[str, Any]]) -> None:
            async with raw.transaction():
                await raw.executemany(EXECUTEMANY_SQL, [tuple(row[c] for c in COLUMNS) for row in batch])

        return executemany
    if method == "asyncpg unnest":
        statement = await raw.prepare(UNNEST_SQL)

        async def unnest(batch: list[dict[str, Any]]) -> None:
            arrays = columns_of(batch)
            async with raw.transaction():
                await statement.fetch(*(arrays[c] for c in COLUMNS))

        return unnest
    raise ValueError(method)


INSERT_METHODS = ("sink._insert_rows", "asyncpg executemany", "asyncpg unnest")


def profile_insert_path(
    runner: asyncio.Runner, database: str, rows: list[dict[str, Any]], spool_dir: Path
) -> pstats.Stats:
    """cProfile of the app's insert path (sink._insert_rows, batch 500) over the given rows."""
    profiler = cProfile.Profile(time.process_time)  # CPU time: waiting for PostgreSQL is not this process's cost
    runner.run(insert_only(database, rows, BATCH_SIZES[0], "sink._insert_rows", spool_dir, profiler))
    return pstats.Stats(profiler)


_SITE = re.compile(r"site-packages/([^/]+)/")


def _package(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "(builtins, C code)"
    match = _SITE.search(filename)
    if match:
        return match[1].removesuffix(".py")
    if f"{ROOT}/app/" in filename:
        return "app"
    if f"{ROOT}/benchmarks/" in filename:
        return "benchmarks"
    return "(stdlib) " + Path(filename).stem


def render_profile(stats: pstats.Stats, top: int = 14) -> str:
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values()) or float("nan")
    by_package: Counter[str] = Counter()
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in entries.items():
        by_package[_package(filename)] += tottime
        rows.append((tottime, cumtime, calls, func, f"{Path(filename).name}:{line}", _package(filename)))
    rows.sort(reverse=True)
    lines = [
        "| own time % | own s | cumulative s | calls | function | where | package |",
        "|---:|---:|---:|---:|---|---|---|",
    ]
    for tottime, cumtime, calls, func, where, package in rows[:top]:
        lines.append(
            f"| {100 * tottime / total:.1f} | {tottime:.3f} | {cumtime:.3f} | {calls:,} | `{func}` | {where}"
            f" | {package} |"
        )
    lines += ["", "| own time % | package |", "|---:|---|"]
    lines += [f"| {100 * s / total:.1f} | {name} |" for name, s in by_package.most_common(10)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Part B: added latency


@dataclass
class Variant:
    audit: bool
    database: str
    env: dict[str, str]
    key: str = ""

    @property
    def label(self) -> str:
        return "on" if self.audit else "off"


def prepare_variant(workdir: Path, database: str, audit: bool) -> Variant:
    label = "on" if audit else "off"
    config: dict[str, Any] = {
        "log_level": "WARNING",
        "database": {"url": pg_url(database)},
        "auth": {"dev_key_file": str(workdir / f"dev-key-{label}")},
        "server": {"access_log": False},
        "audit": {"enabled": audit, "spool_dir": str(workdir / f"audit-spool-{label}")},
        "providers": {"simulated": {"kind": "simulated", "tokens_per_second": 0}},
        "models": {name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
    }
    config_path = workdir / f"pacemaker-{label}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}
    env.update(PACEMAKER_CONFIG=str(config_path), PYTHONUNBUFFERED="1")
    variant = Variant(audit, database, env)
    # tpm 2*10^9, not the 10^12 one might pick: api_key.tpm is an INTEGER column, and PostgreSQL refuses more.
    limits = ["--rpm", "100000000", "--tpm", "2000000000", "--max-concurrency", "10000"]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--name", f"bench-{label}", "--json", *limits],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"keys create failed ({done.returncode}):\n{done.stderr}")
    variant.key = orjson.loads(done.stdout)["key"]
    return variant


def start_server(workdir: Path, variant: Variant, children: list[Child]) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    log_path = workdir / f"server-{variant.label}.log"
    child = Child(f"pacemaker (audit {variant.label})", args, variant.env, log_path, port)
    children.append(child)
    child.wait_for_port()
    return child


@dataclass
class LoadRun:
    variant: str
    pair: int
    tag: str
    window_s: float = 0.0
    scheduled: int = 0  # requests scheduled in the measured window
    latencies_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)  # launch time minus scheduled time
    errors: Counter[str] = field(default_factory=Counter)
    answered: set[str] = field(default_factory=set)  # request ids that got an HTTP response (warm-up too)
    launched: int = 0
    server_cpu_s: float = float("nan")
    cpu: CpuWindow = field(default_factory=CpuWindow)
    rows: RowsCheck | None = None
    server_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_ms_per_request(self) -> float:
        ok = len(self.latencies_ms)
        return self.server_cpu_s * 1000 / ok if ok else float("nan")

    @property
    def ok_rate(self) -> float:
        return len(self.latencies_ms) / self.window_s if self.window_s else float("nan")

    @property
    def sent_rate(self) -> float:
        return self.scheduled / self.window_s if self.window_s else float("nan")

    def percentile(self, q: float, values: Sequence[float] | None = None) -> float:
        ordered = sorted(self.latencies_ms if values is None else values)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]  # nearest rank


@dataclass
class RowsCheck:
    answered: int
    rows: int
    missing: int
    duplicated: int
    unexpected: int
    statuses: dict[str, int]


async def smoke(url: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "audit-bench-smoke"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(url, json={"query": QUERY}, headers=headers) as response,
    ):
        content = await response.read()
        if response.status != 200 or b'"status":"completed"' not in content:
            raise RuntimeError(f"smoke request: HTTP {response.status} {content[:300]!r}")


async def open_loop(url: str, key: str, run: LoadRun, warmup_s: float, seconds: float, server: Child) -> None:
    """Launch a request every 2 ms, whatever the responses do; the window is the requests scheduled after warm-up."""
    body = orjson.dumps({"query": QUERY})
    base_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    total = round((warmup_s + seconds) * RATE)
    first = round(warmup_s * RATE)
    run.scheduled = total - first
    latencies: list[float | None] = [None] * total
    lags: list[float] = [0.0] * total
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=4000, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=["User-Agent"]) as http:

        async def one(i: int, scheduled: float) -> None:
            request_id = f"{run.tag}-{i}"
            headers = {**base_headers, "x-request-id": request_id}
            launched = time.perf_counter()
            lags[i] = (launched - scheduled) * 1000
            try:
                async with http.post(url, data=body, headers=headers) as response:
                    content = await response.read()
                    status = response.status
                done = time.perf_counter()
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.errors[f"{type(exc).__name__}: {exc}"[:160]] += 1
                return
            run.answered.add(request_id)
            if status == 200 and b'"status":"completed"' in content:
                latencies[i] = (done - launched) * 1000
            else:
                run.errors[f"HTTP {status}: {content[:120]!r}"] += 1

        begin = time.perf_counter() + 0.05
        window_start, window_end = begin + first * INTERVAL_S, begin + total * INTERVAL_S
        snapshots: list[float] = []

        async def sampler() -> None:
            await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
            run.cpu.start()
            snapshots.append(server.cpu_seconds())
            await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
            run.cpu.stop()
            snapshots.append(server.cpu_seconds())

        sampling = asyncio.create_task(sampler())
        for i in range(total):
            scheduled = begin + i * INTERVAL_S
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        run.launched = total
        await sampling
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT_S + 5)
            for task in pending:
                task.cancel()
    run.window_s = window_end - window_start
    run.latencies_ms = [ms for ms in latencies[first:] if ms is not None]
    run.lags_ms = lags[first:]
    run.server_cpu_s = snapshots[1] - snapshots[0]


_METRIC = re.compile(r"^(pacemaker_audit_rows_(?:written|spooled)_total) ([0-9.e+]+)$", re.MULTILINE)


async def audit_metrics(base_url: str) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"{base_url}/metrics") as response:
        found = _METRIC.findall(await response.text())
    return {name: float(value) for name, value in found}


async def check_rows(database: str, run: LoadRun) -> RowsCheck:
    """Match the run's rows with the requests the server answered (after the server stopped: all flushed)."""
    pg = await asyncpg.connect(pg_dsn(database), timeout=10)
    prefix = f"{run.tag}-"
    try:
        deadline = time.perf_counter() + 15
        while time.perf_counter() < deadline:  # stop() flushed already; this only waits out a slow commit
            count = await pg.fetchval("SELECT count(*) FROM audit_record WHERE starts_with(request_id, $1)", prefix)
            if count >= len(run.answered):
                break
            await asyncio.sleep(0.2)
        found = await pg.fetch(
            "SELECT request_id, count(*) AS n FROM audit_record WHERE starts_with(request_id, $1) GROUP BY request_id",
            prefix,
        )
        statuses = await pg.fetch(
            "SELECT status, count(*) AS n FROM audit_record WHERE starts_with(request_id, $1) GROUP BY status", prefix
        )
    finally:
        await pg.close()
    per_id = {row["request_id"]: int(row["n"]) for row in found}
    return RowsCheck(
        answered=len(run.answered),
        rows=sum(per_id.values()),
        missing=len(run.answered - per_id.keys()),
        duplicated=sum(n - 1 for n in per_id.values() if n > 1),
        unexpected=len(per_id.keys() - run.answered),
        statuses={row["status"]: int(row["n"]) for row in statuses},
    )


def run_latency_pair(
    runner: asyncio.Runner,
    workdir: Path,
    variant: Variant,
    pair: int,
    args: argparse.Namespace,
    pinning: bool,
    children: list[Child],
) -> LoadRun:
    server = start_server(workdir, variant, children)
    try:
        if pinning:
            pin(server.popen.pid, {SERVER_CPU})
            pin(os.getpid(), {LOAD_CPU})
        base_url = f"http://{HOST}:{server.port}"
        runner.run(smoke(f"{base_url}/v1/tasks", variant.key))
        run = LoadRun(variant.label, pair, f"audit-bench-p{pair}-{variant.label}")
        log(f"pair {pair}, audit {variant.label}: {args.warmup:g} s warm-up + {args.seconds:g} s at {RATE} req/s ...")
        runner.run(open_loop(f"{base_url}/v1/tasks", variant.key, run, args.warmup, args.seconds, server))
        if variant.audit:
            run.server_metrics = runner.run(audit_metrics(base_url))
    finally:
        code = server.stop(STOP_TIMEOUT_S)
        children.remove(server)
    if code not in (0, None, -signal.SIGTERM):  # uvicorn re-raises the SIGTERM it handled
        log(f"{server.name} exited with {code}:\n{server.output()}")
    if variant.audit:
        run.rows = runner.run(check_rows(variant.database, run))
    log(
        f"{'':22}{run.ok_rate:,.0f} ok/s, p50 {run.percentile(50):.3f} ms, p90 {run.percentile(90):.3f} ms,"
        f" p99 {run.percentile(99):.3f} ms, server CPU {100 * run.server_cpu_s / run.window_s:.0f} %"
        + (f", rows {run.rows.rows}/{run.rows.answered}" if run.rows else "")
    )
    for error, count in run.errors.most_common(3):
        log(f"{'':22}{count} x {error}")
    return run


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_a(
    runs: Sequence[InsertRun], row_us: float, facts: dict[str, str], args: argparse.Namespace, profile: str | None
) -> str:
    rounds = f"median of {args.rounds} rounds by rows/s" if args.rounds > 1 else "one round"
    lines = [
        "### Audit sink: batched inserts into PostgreSQL",
        "",
        f"PostgreSQL {facts['version']} on 127.0.0.1 (synchronous_commit={facts['synchronous_commit']},"
        f" fsync={facts['fsync']}, shared_buffers={facts['shared_buffers']}), {args.rows:,} rows per run into an"
        f" empty audit_record (truncated before each run), {rounds}; {platform.python_implementation()}"
        f" {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, asyncpg {asyncpg.__version__}, uvloop;"
        f" {psutil.cpu_count()} CPUs, nothing pinned in this part. Building one row (AuditContext.row(), the"
        f" request path's share) took {row_us:.1f} µs.",
        "",
        "End to end: a producer submits every row to a started sink (keeping within its 20,000-row queue);"
        " the time runs from the first submit until count(*) finds every row in the table.",
        "",
        "| sink | batch_size | rows/s | rows/s, all rounds | seconds | batches | spooled | client CPU µs/row"
        " | PG CPU µs/row (our backends) | other CPU % | target | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r, all_rates in median_runs(runs, "sink"):
        name = "AuditSink (app)" if r.method == "AuditSink" else "UnnestSink (this benchmark: one unnest per batch)"
        lines.append(
            f"| {name} | {r.batch_size:,} | {fmt(r.rows_per_s, 0)} | {' / '.join(fmt(x, 0) for x in all_rates)}"
            f" | {fmt(r.seconds)} | {r.batches:,} | {r.spooled} | {fmt(r.per_row_us(r.cpu.me), 1)}"
            f" | {fmt(r.per_row_us(r.cpu.pg_ours), 1)} | {fmt(100 * r.other_cpu / r.seconds, 0)}"
            f" | >= {TARGET_ROWS_PER_S:,} | {verdict(r.rows_per_s >= TARGET_ROWS_PER_S)} |"
        )
    lines += [
        "",
        "The insert alone: the same rows written batch after batch, one transaction per batch, no queue and no"
        " writer task. Wall time per row = client CPU + PostgreSQL CPU + waiting (round trips, WAL flush at"
        " commit; negative when the two CPUs overlap, as asyncpg's pipelined executemany lets them).",
        "",
        "| insert path | batch | rows/s | rows/s, all rounds | ms/batch | wall µs/row | client CPU µs/row"
        " | PG CPU µs/row (our backends) | waiting µs/row | PG CPU µs/row (all of PostgreSQL) | other CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, all_rates in median_runs(runs, "insert"):
        wall = r.per_row_us(r.seconds)
        me, ours = r.per_row_us(r.cpu.me), r.per_row_us(r.cpu.pg_ours)
        lines.append(
            f"| {r.method} | {r.batch_size:,} | {fmt(r.rows_per_s, 0)} | {' / '.join(fmt(x, 0) for x in all_rates)}"
            f" | {fmt(r.seconds * 1000 / r.batches)} | {fmt(wall, 1)} | {fmt(me, 1)} | {fmt(ours, 1)}"
            f" | {fmt(wall - me - ours, 1)} | {fmt(r.per_row_us(r.cpu.pg_all), 1)}"
            f" | {fmt(100 * r.other_cpu / r.seconds, 0)} |"
        )
    lines += [
        "",
        "sink._insert_rows is the app's path (SQLAlchemy Core insert().on_conflict_do_nothing(), executemany over"
        " dicts); asyncpg executemany is the same statement sent by asyncpg alone (rows as tuples); asyncpg unnest"
        " is one INSERT ... SELECT FROM unnest($1::varchar(32)[], ...) ON CONFLICT (record_uid) DO NOTHING per"
        " batch. PG CPU (all of PostgreSQL) also counts its WAL writer and checkpointer, and any other user of"
        " the shared server; other CPU % (of one core) is the rest of the machine's busy time: rows with much of"
        " it were disturbed.",
    ]
    if profile:
        lines += [
            "",
            f"#### Where the app's insert path spends this process's CPU (cProfile on CPU time, batch"
            f" {BATCH_SIZES[0]}, {min(args.profile_rows, args.rows):,} rows)",
            "",
            profile,
        ]
    return "\n".join(lines) + "\n"


def render_b(runs: Sequence[LoadRun], args: argparse.Namespace, pinning: bool) -> str:
    lines = [
        "### Audit path: added latency at a steady 500 req/s",
        "",
        f"POST /v1/tasks (JSON, one simulated model call, unpaced) on `pacemaker serve` (one worker, PostgreSQL),"
        f" audit.enabled off and on, run off, on, off, on, each server started for its run; open-loop load: one"
        f" request launched every 2 ms whatever the responses do (aiohttp, uvloop), {args.warmup:g} s warm-up +"
        f" {args.seconds:g} s measured; latency from launch to the response's last byte;"
        f" {'server pinned to CPU 0, load generator to CPU 1' if pinning else 'nothing pinned'}.",
        "",
        "| pair | audit | sent/s | ok/s | p50 ms | p90 ms | p99 ms | max ms | > 10 ms | launch lag p99 ms"
        " | server CPU ms/req | server CPU % | PG CPU % | other CPU % | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.pair} | {r.variant} | {fmt(r.sent_rate, 0)} | {fmt(r.ok_rate, 0)} | {fmt(r.percentile(50), 3)}"
            f" | {fmt(r.percentile(90), 3)} | {fmt(r.percentile(99), 3)} | {fmt(r.percentile(100), 2)}"
            f" | {sum(ms > 10 for ms in r.latencies_ms)} | {fmt(r.percentile(99, r.lags_ms), 2)}"
            f" | {fmt(r.cpu_ms_per_request, 3)} | {fmt(100 * r.server_cpu_s / r.window_s, 0)}"
            f" | {fmt(100 * r.cpu.pg_all / r.window_s, 0)}"
            f" | {fmt(100 * max(0.0, r.cpu.machine - r.cpu.pg_all - r.cpu.me - r.server_cpu_s) / r.window_s, 0)}"
            f" | {sum(r.errors.values())} |"
        )
    lines += [
        "",
        "CPU % is of one core over the measured window: the server; PostgreSQL (all its processes: the audit"
        " writes, and anyone else's use of the shared server); other = the rest of the machine's busy time,"
        " outside this benchmark. > 10 ms: responses slower than 10 ms. Launch lag: how late the generator launched"
        " requests against the 2 ms schedule.",
        "",
        "| pair | p50 off | p50 on | added p50 ms | added p90 ms | added p99 ms | added server CPU ms/req"
        " | target (added p50) | verdict |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for pair in sorted({r.pair for r in runs}):
        off = next((r for r in runs if r.pair == pair and r.variant == "off"), None)
        on = next((r for r in runs if r.pair == pair and r.variant == "on"), None)
        if not (off and on):
            continue
        added = [on.percentile(q) - off.percentile(q) for q in (50, 90, 99)]
        lines.append(
            f"| {pair} | {fmt(off.percentile(50), 3)} | {fmt(on.percentile(50), 3)} | {fmt(added[0], 3)}"
            f" | {fmt(added[1], 3)} | {fmt(added[2], 3)} | {fmt(on.cpu_ms_per_request - off.cpu_ms_per_request, 3)}"
            f" | < {TARGET_ADDED_P50_MS} ms"
            f" | {verdict(added[0] < TARGET_ADDED_P50_MS)} |"
        )
    lines += [
        "",
        "Every request an audit-on server answered (warm-up included) against its rows, matched by x-request-id"
        " after the server stopped:",
        "",
        "| pair | requests answered | audit rows | missing | duplicated | rows of no request | statuses"
        " | rows written (server metric) | rows spooled |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        if r.rows is None:
            continue
        c = r.rows
        statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(c.statuses.items()))
        written = r.server_metrics.get("pacemaker_audit_rows_written_total", math.nan)
        spooled = r.server_metrics.get("pacemaker_audit_rows_spooled_total", math.nan)
        lines.append(
            f"| {r.pair} | {c.answered:,} | {c.rows:,} | {c.missing} | {c.duplicated} | {c.unexpected}"
            f" | {statuses} | {fmt(written, 0)} | {fmt(spooled, 0)} |"
        )
    lines += ["", "(The metric is read before shutdown: the last rows are flushed by the shutdown itself.)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per insert run in part A (default 100000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run in part B (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run in part B (default 2)")
    parser.add_argument("--parts", default="a,b", help="comma-separated subset of a, b (default a,b)")
    parser.add_argument("--rounds", type=int, default=3, help="part A: rounds of every run, median shown (default 3)")
    parser.add_argument("--profile-rows", type=int, default=20_000, help="rows in part A's cProfile (0: none)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs in part B")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, server logs)")
    args = parser.parse_args(argv)
    args.parts = {p.strip().lower() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - {"a", "b"}:
        parser.error("--parts takes a, b or a,b")
    if not (
        1000 <= args.rows <= 5_000_000
        and 1 <= args.seconds <= 300
        and 0 <= args.warmup <= 60
        and 0 <= args.profile_rows <= 1_000_000
        and 1 <= args.rounds <= 20
    ):
        parser.error(
            "--rows must be in [1000, 5000000], --seconds in [1, 300], --warmup in [0, 60],"
            " --profile-rows in [0, 1000000], --rounds in [1, 20]"
        )
    return args


def command_line(argv: Sequence[str] | None) -> str:
    given = list(sys.argv[1:] if argv is None else argv)
    return " ".join([".venv/bin/python -m benchmarks.audit", *given])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = (
        not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
    )
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-audit-"))
    databases = Databases()
    children: list[Child] = []
    output: list[str] = [f"Command: `{command_line(argv)}`\n"]
    try:
        with terminate_on_sigterm():
            if not args.no_wait:
                wait_for_quiet_machine()
            facts = asyncio.run(server_facts())
            if "a" in args.parts:
                output.append(part_a(args, databases, workdir, facts))
            if "b" in args.parts:
                output.append(part_b(args, databases, workdir, pinning, children))
            print("\n".join(output))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for child in reversed(children):
            child.stop()
        databases.drop_all()
        clean_up([], workdir, keep=args.keep)
    return 0


def part_a(args: argparse.Namespace, databases: Databases, workdir: Path, facts: dict[str, str]) -> str:
    log("part A: creating and migrating a database ...")
    database = databases.create("inserts")
    log(f"building {args.rows:,} rows ...")
    rows, row_us = make_rows(args.rows)
    runs: list[InsertRun] = []
    spool_dir = workdir / "spool-a"
    with asyncio.Runner(loop_factory=new_loop) as runner:
        for round_no in range(1, args.rounds + 1):  # in turns, so that drift hits every variant alike
            for sink_class in (AuditSink, UnnestSink):
                for batch_size in BATCH_SIZES:
                    log(f"  round {round_no}/{args.rounds}: {sink_class.__name__}, batch_size {batch_size} ...")
                    run = runner.run(through_sink(database, rows, batch_size, spool_dir, sink_class))
                    log(f"{'':4}{run.rows_per_s:,.0f} rows/s, other CPU {100 * run.other_cpu / run.seconds:.0f} %")
                    runs.append(run)
            for method in INSERT_METHODS:
                for batch_size in BATCH_SIZES:
                    log(f"  round {round_no}/{args.rounds}: insert only, {method}, batch {batch_size} ...")
                    run = runner.run(insert_only(database, rows, batch_size, method, spool_dir))
                    log(f"{'':4}{run.rows_per_s:,.0f} rows/s, other CPU {100 * run.other_cpu / run.seconds:.0f} %")
                    runs.append(run)
        profile = None
        if args.profile_rows:
            log(f"  cProfile of sink._insert_rows over {min(args.profile_rows, len(rows)):,} rows ...")
            profile = render_profile(profile_insert_path(runner, database, rows[: args.profile_rows], spool_dir))
    if spool_dir.exists() and any(spool_dir.iterdir()):
        log(f"warning: the spool {spool_dir} is not empty")
    return render_a(runs, row_us, facts, args, profile)


def part_b(args: argparse.Namespace, databases: Databases, workdir: Path, pinning: bool, children: list[Child]) -> str:
    log("part B: creating and migrating two databases, creating keys ...")
    variants = {
        audit: prepare_variant(workdir, databases.create("on" if audit else "off"), audit) for audit in (False, True)
    }
    runs: list[LoadRun] = []
    affinity = os.sched_getaffinity(0)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            for pair in (1, 2):
                for audit in (False, True):
                    runs.append(run_latency_pair(runner, workdir, variants[audit], pair, args, pinning, children))
    finally:
        os.sched_setaffinity(0, affinity)
    return render_b(runs, args, pinning)


if __name__ == "__main__":
    sys.exit(main())
