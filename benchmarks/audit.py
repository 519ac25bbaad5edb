"""Benchmark the audit log: the sink's throughput into PostgreSQL, and the latency the audit path adds.

    .venv/bin/python -m benchmarks.audit [--rows 100000] [--seconds 10] [--warmup 2] [--parts a,b] [--smoke]

Part A, in this process, on a fresh migrated database on the shared server (127.0.0.1:5432): the
request path's share per row (AuditContext.row(), and AuditSink.submit(): storable text, one write(2)
to the journal, the queue), then the sink end to end: --rows realistic rows submitted by a producer
that keeps within the queue, timed from the first submit until count(*) has every row, at batch 500
and 2000, with the CPU it cost this process and the database's backends. A run must be clean: no row
read back from the journal or dead-lettered, and the journal empty after stop.

Part B, end to end: `pacemaker serve` with audit.enabled off and on (fresh databases, simulated
provider unpaced, limits that never bind), run off, on, off, on; an open-loop generator launches
POST /v1/tasks every 2 ms (500 req/s) for --warmup then --seconds; latency is launch to last byte.
After an audit-on run every answered request is matched with its row by x-request-id. With two CPUs
the server is pinned to CPU 0 and this process to CPU 1.

--smoke takes a few seconds (small runs, one audit-on run, no waiting, no pinning; figures mean
nothing) and exits 1 unless every row arrived once. Otherwise the benchmark first waits (at most 10
minutes) while another `python -m benchmarks.*` runs. Children are stopped and databases dropped on
every exit. Stdout is markdown for the README; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import re
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
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
from sqlalchemy import text

from app.audit.context import AuditContext
from app.audit.sink import AuditSink
from app.config import AuditSettings, DatabaseSettings
from app.db import create_engine, migrate
from app.observability.metrics import Metrics
from benchmarks.harness import (
    HOST,
    Child,
    can_pin,
    clean_up,
    exit_status,
    fmt,
    log,
    machine_busy,
    new_loop,
    own_cpu,
    pacemaker_cli,
    percentile,
    pin_under_test,
    serve_pacemaker,
    terminate_on_sigterm,
    verdict,
    wait_for_quiet_machine,
    write_config,
)

PG_HOSTPORT = "127.0.0.1:5432"
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOSTPORT}/test"
DB_PREFIX = "pacemaker_bench_audit_"
BATCH_SIZES = (500, 2000)
RATE = 500  # requests per second in part B
INTERVAL_S = 1 / RATE
QUERY = "Summarise the main risks of moving a billing service from MySQL to PostgreSQL, in a few sentences."
REQUEST_TIMEOUT_S = 10.0  # no request may hold a run longer than this
STOP_TIMEOUT_S = 45.0  # uvicorn's graceful shutdown (30 s) plus the audit flush
TARGET_ROWS_PER_S = 20_000
TARGET_ADDED_P50_MS = 0.5
SUBMIT_SAMPLE = 20_000  # rows timed through submit() alone


def pg_url(name: str) -> str:
    return f"postgresql+asyncpg://postgres@{PG_HOSTPORT}/{name}"


def pg_dsn(name: str) -> str:
    return f"postgresql://postgres@{PG_HOSTPORT}/{name}"


# ---------------------------------------------------------------------------------------------
# Databases, the machine


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
        for name in ("synchronous_commit", "fsync", "shared_buffers"):
            facts[name] = str(await connection.fetchval(f"SHOW {name}"))
        return facts
    finally:
        await connection.close()


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
        self._start = (own_cpu(), postgres_cpu(), machine_busy(), time.perf_counter())

    def stop(self, our_pids: Sequence[int] = ()) -> None:
        assert self._start is not None
        me0, pg0, machine0, wall0 = self._start
        me1 = own_cpu()
        pg1 = postgres_cpu()
        self.wall = time.perf_counter() - wall0
        self.me = me1 - me0
        self.pg_all = sum(now - pg0.get(pid, 0.0) for pid, now in pg1.items())
        if our_pids:
            self.pg_ours = sum(pg1[pid] - pg0.get(pid, 0.0) for pid in our_pids if pid in pg1)
        self.machine = machine_busy() - machine0


async def backend_pids(pg: asyncpg.Connection, database: str) -> list[int]:
    """The server processes working for one database (its client backends, autovacuum workers)."""
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    return [int(row["pid"]) for row in rows]


# ---------------------------------------------------------------------------------------------
# Part A: the sink

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
class SinkRun:
    batch_size: int
    rows: int
    seconds: float
    cpu: CpuWindow
    batches: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")

    def per_row_us(self, seconds: float) -> float:
        return seconds / self.rows * 1e6 if self.rows else float("nan")

    @property
    def other_cpu(self) -> float:
        """Busy CPU seconds of the machine outside this process and PostgreSQL: noise."""
        return max(0.0, self.cpu.machine - self.cpu.me - self.cpu.pg_all)


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def submit_cost(database: str, rows: list[dict[str, Any]], journal_dir: Path) -> float:
    """CPU µs per row of AuditSink.submit() alone (storable text, the journal's write, the queue): no writer runs."""
    engine = create_engine(DatabaseSettings(url=pg_url(database)))  # never connects
    sink = AuditSink(engine, AuditSettings(queue_size=len(rows) + 1, spool_dir=journal_dir), Metrics())
    copies = [dict(row) for row in rows]
    started = time.process_time()  # CPU time: what the request path pays, whatever else the machine runs
    for row in copies:
        sink.submit(row)
    seconds = time.process_time() - started
    sink.journal.close()  # its rows are never meant for the database: the directory goes
    await engine.dispose()
    for path in journal_dir.iterdir():
        path.unlink()
    return seconds / len(rows) * 1e6


async def through_sink(database: str, rows: list[dict[str, Any]], batch_size: int, journal_dir: Path) -> SinkRun:
    """Submit every row to a started sink (keeping within its queue); time until count(*) has them all."""
    settings = AuditSettings(batch_size=batch_size, spool_dir=journal_dir)
    engine = create_engine(DatabaseSettings(url=pg_url(database)))
    metrics = Metrics()
    sink = AuditSink(engine, settings, metrics)
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
    read_back = _sample(metrics, "pacemaker_audit_rows_spooled_total")
    if read_back or sink.dead_lettered or sink.spool_error or any(journal_dir.glob("segment-*")):
        raise RuntimeError(
            f"not a clean run: {read_back:.0f} rows read back from the journal, {sink.dead_lettered} dead-lettered,"
            f" journal error {sink.spool_error}, segments left: {sorted(journal_dir.glob('segment-*'))}"
        )
    return SinkRun(batch_size, n, seconds, cpu, int(_sample(metrics, "pacemaker_audit_flush_seconds_count")))


def median_runs(runs: Sequence[SinkRun]) -> list[tuple[SinkRun, list[float]]]:
    """Per batch size, in first-seen order: the round with the median rows/s, and every round's."""
    groups: dict[int, list[SinkRun]] = {}
    for run in runs:
        groups.setdefault(run.batch_size, []).append(run)
    chosen = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r.rows_per_s)
        chosen.append((ordered[(len(ordered) - 1) // 2], [r.rows_per_s for r in group]))
    return chosen


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
        "audit": {"enabled": audit, "spool_dir": str(workdir / f"audit-journal-{label}")},
        "providers": {"simulated": {"kind": "simulated", "tokens_per_second": 0}},
        "models": {name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
    }
    variant = Variant(audit, database, write_config(workdir / f"pacemaker-{label}.yaml", config))
    # tpm 2*10^9, not the 10^12 one might pick: api_key.tpm is an INTEGER column, and PostgreSQL refuses more.
    limits = ["--rpm", "100000000", "--tpm", "2000000000", "--max-concurrency", "10000"]
    created = pacemaker_cli(variant.env, "keys", "create", "--name", f"bench-{label}", "--json", *limits)
    variant.key = orjson.loads(created)["key"]
    return variant


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
        return percentile(sorted(self.latencies_ms if values is None else values), q)


@dataclass
class RowsCheck:
    answered: int
    rows: int
    missing: int
    duplicated: int
    unexpected: int
    statuses: dict[str, int]


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
        await sampling
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT_S + 5)
            for task in pending:
                task.cancel()
    run.window_s = window_end - window_start
    run.latencies_ms = [ms for ms in latencies[first:] if ms is not None]
    run.lags_ms = lags[first:]
    run.server_cpu_s = snapshots[1] - snapshots[0]


async def first_request(url: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "audit-bench-first"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http,
        http.post(url, json={"query": QUERY}, headers=headers) as response,
    ):
        content = await response.read()
    if response.status != 200 or b'"status":"completed"' not in content:
        raise RuntimeError(f"first request: HTTP {response.status} {content[:300]!r}")


_METRIC = re.compile(r"^(pacemaker_audit_rows_(?:written|spooled|dead_lettered)_total) ([0-9.e+]+)$", re.MULTILINE)


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


def run_latency(
    runner: asyncio.Runner, workdir: Path, variant: Variant, pair: int, args: argparse.Namespace, children: list[Child]
) -> LoadRun:
    name, log_path = f"pacemaker (audit {variant.label})", workdir / f"server-{variant.label}.log"
    server = serve_pacemaker(name, variant.env, log_path, children)
    try:
        if args.pinning:
            pin_under_test(server, [server])
        base_url = f"http://{HOST}:{server.port}"
        runner.run(first_request(f"{base_url}/v1/tasks", variant.key))
        run = LoadRun(variant.label, pair, f"audit-bench-p{pair}-{variant.label}")
        log(f"pair {pair}, audit {variant.label}: {args.warmup:g} s warm-up + {args.seconds:g} s at {RATE} req/s ...")
        runner.run(open_loop(f"{base_url}/v1/tasks", variant.key, run, args.warmup, args.seconds, server))
        if variant.audit:
            try:
                run.server_metrics = runner.run(audit_metrics(base_url))
            except (aiohttp.ClientError, TimeoutError) as exc:  # an overloaded server: the rows are checked anyway
                log(f"could not read the server's metrics: {type(exc).__name__}: {exc}")
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


def render_a(
    runs: Sequence[SinkRun], row_us: float, submit_us: float, facts: dict[str, str], args: argparse.Namespace
) -> str:
    rounds = f"median of {args.rounds} rounds by rows/s" if args.rounds > 1 else "one round"
    lines = [
        "### Audit sink: journal and batched inserts into PostgreSQL",
        "",
        f"PostgreSQL {facts['version']} on 127.0.0.1 (synchronous_commit={facts['synchronous_commit']},"
        f" fsync={facts['fsync']}, shared_buffers={facts['shared_buffers']}), {args.rows:,} rows per run into an"
        f" empty audit_record, {rounds}; {platform.python_implementation()} {platform.python_version()},"
        f" SQLAlchemy {sqlalchemy.__version__}, asyncpg {asyncpg.__version__}, uvloop; {psutil.cpu_count()} CPUs,"
        f" nothing pinned in this part. The request path's share per row: AuditContext.row() {row_us:.1f} µs"
        f" (wall), AuditSink.submit() {submit_us:.1f} µs of CPU (storable text, one write(2) to the journal, the"
        " queue).",
        "",
        "A producer submits every row to a started sink (keeping within its 20,000-row queue); the time runs from"
        " the first submit until count(*) finds every row in the table. The journal is fsynced once per flush"
        " interval in a thread; no row was read back from it or dead-lettered, and it was empty after stop.",
        "",
        "| batch_size | rows/s | rows/s, all rounds | seconds | batches | client CPU µs/row"
        " | PG CPU µs/row (our backends) | other CPU % | target | verdict |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r, all_rates in median_runs(runs):
        lines.append(
            f"| {r.batch_size:,} | {fmt(r.rows_per_s, 0)} | {' / '.join(fmt(x, 0) for x in all_rates)}"
            f" | {fmt(r.seconds)} | {r.batches:,} | {fmt(r.per_row_us(r.cpu.me), 1)}"
            f" | {fmt(r.per_row_us(r.cpu.pg_ours), 1)} | {fmt(100 * r.other_cpu / r.seconds, 0)}"
            f" | >= {TARGET_ROWS_PER_S:,} | {verdict(r.rows_per_s >= TARGET_ROWS_PER_S)} |"
        )
    lines += [
        "",
        "Other CPU % (of one core) is the rest of the machine's busy time: rows with much of it were disturbed.",
    ]
    return "\n".join(lines) + "\n"


def render_b(runs: Sequence[LoadRun], args: argparse.Namespace) -> str:
    lines = [
        "### Audit path: added latency at a steady 500 req/s",
        "",
        f"POST /v1/tasks (JSON, one simulated model call, unpaced) on `pacemaker serve` (one worker, PostgreSQL),"
        f" audit.enabled {'on only (smoke)' if args.smoke else 'off and on, run off, on, off, on'}, each server"
        " started for its run; open-loop load: one"
        f" request launched every 2 ms whatever the responses do (aiohttp, uvloop), {args.warmup:g} s warm-up +"
        f" {args.seconds:g} s measured; latency from launch to the response's last byte;"
        f" {'server pinned to CPU 0, load generator to CPU 1' if args.pinning else 'nothing pinned'}.",
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
        " | rows written (server metric) | read back from the journal | dead-lettered |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in runs:
        if r.rows is None:
            continue
        c = r.rows
        statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(c.statuses.items()))
        written = r.server_metrics.get("pacemaker_audit_rows_written_total", math.nan)
        spooled = r.server_metrics.get("pacemaker_audit_rows_spooled_total", math.nan)
        dead = r.server_metrics.get("pacemaker_audit_rows_dead_lettered_total", math.nan)
        lines.append(
            f"| {r.pair} | {c.answered:,} | {c.rows:,} | {c.missing} | {c.duplicated} | {c.unexpected}"
            f" | {statuses} | {fmt(written, 0)} | {fmt(spooled, 0)} | {fmt(dead, 0)} |"
        )
    lines += ["", "(The metric is read before shutdown: the last rows are flushed by the shutdown itself.)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per sink run in part A (default 100000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run in part B (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run in part B (default 2)")
    parser.add_argument("--parts", default="a,b", help="comma-separated subset of a, b (default a,b)")
    parser.add_argument("--rounds", type=int, default=3, help="part A: rounds of every run, median shown (default 3)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: small runs, exit status 1 on any loss")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs in part B")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, server logs)")
    args = parser.parse_args(argv)
    args.parts = {p.strip().lower() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - {"a", "b"}:
        parser.error("--parts takes a, b or a,b")
    if args.smoke:
        args.rows, args.rounds, args.warmup, args.seconds, args.no_wait, args.no_pin = 5_000, 1, 0.5, 1.0, True, True
    if not (1000 <= args.rows <= 5_000_000 and 1 <= args.seconds <= 300 and 0 <= args.warmup <= 60):
        parser.error("--rows must be in [1000, 5000000], --seconds in [1, 300], --warmup in [0, 60]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in [1, 20]")
    args.pinning = can_pin(args.no_pin)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-audit-"))
    databases = Databases()
    children: list[Child] = []
    failures: list[str] = []
    given = list(sys.argv[1:] if argv is None else argv)
    output: list[str] = [f"Command: `{' '.join(['.venv/bin/python -m benchmarks.audit', *given])}`\n"]
    try:
        with terminate_on_sigterm():
            if not args.no_wait:
                wait_for_quiet_machine()
            facts = asyncio.run(server_facts())
            if "a" in args.parts:
                output.append(part_a(args, databases, workdir, facts))
            if "b" in args.parts:
                output.append(part_b(args, databases, workdir, children, failures))
            print("\n".join(output))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for child in reversed(children):
            child.stop()
        databases.drop_all()
        clean_up([], workdir, keep=args.keep)
    return exit_status(failures)


def part_a(args: argparse.Namespace, databases: Databases, workdir: Path, facts: dict[str, str]) -> str:
    """Raises RuntimeError when a run is not clean (rows missing, read back, dead-lettered, left on disk)."""
    log("part A: creating and migrating a database ...")
    database = databases.create("sink")
    log(f"building {args.rows:,} rows ...")
    rows, row_us = make_rows(args.rows)
    runs: list[SinkRun] = []
    batch_sizes = BATCH_SIZES[:1] if args.smoke else BATCH_SIZES
    with asyncio.Runner(loop_factory=new_loop) as runner:
        sample = make_rows(SUBMIT_SAMPLE // 10 if args.smoke else SUBMIT_SAMPLE, seed=11)[0]
        submit_us = runner.run(submit_cost(database, sample, workdir / "journal-submit"))
        log(f"  submit() alone: {submit_us:.1f} µs per row")
        for round_no in range(1, args.rounds + 1):  # in turns, so that drift hits every variant alike
            for batch_size in batch_sizes:
                log(f"  round {round_no}/{args.rounds}: batch_size {batch_size} ...")
                run = runner.run(through_sink(database, rows, batch_size, workdir / "journal-a"))
                log(f"{'':4}{run.rows_per_s:,.0f} rows/s, other CPU {100 * run.other_cpu / run.seconds:.0f} %")
                runs.append(run)
    return render_a(runs, row_us, submit_us, facts, args)


def part_b(
    args: argparse.Namespace, databases: Databases, workdir: Path, children: list[Child], failures: list[str]
) -> str:
    log("part B: creating and migrating the databases, creating keys ...")
    kinds = (True,) if args.smoke else (False, True)
    variants = {audit: prepare_variant(workdir, databases.create("on" if audit else "off"), audit) for audit in kinds}
    runs: list[LoadRun] = []
    affinity = os.sched_getaffinity(0)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            for pair in (1,) if args.smoke else (1, 2):
                for audit in kinds:
                    runs.append(run_latency(runner, workdir, variants[audit], pair, args, children))
    finally:
        os.sched_setaffinity(0, affinity)
    for run in runs:
        # Rows of requests the client gave up on are no loss (the server finished them); a missing row is.
        if run.rows is not None and (run.rows.missing or run.rows.duplicated):
            failures.append(f"pair {run.pair}: {run.rows}")
        if refused := sum(n for error, n in run.errors.items() if error.startswith("HTTP ")):
            failures.append(f"pair {run.pair}, audit {run.variant}: {refused} requests answered with an error")
    return render_b(runs, args)


if __name__ == "__main__":
    sys.exit(main())
