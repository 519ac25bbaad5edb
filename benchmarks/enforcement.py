"""Benchmark the latency the enforcement chain adds to a request: in-process limits, Redis, and off.

    .venv/bin/python -m benchmarks.enforcement [--requests 20000] [--seconds 5] [--rounds 3] [--profile] [--smoke]

Part A (in process, the precise figure). Real Enforcer objects, built by app.lifespan.build_enforcer
from a Settings of app.config.load_settings, run the chain one request goes through on the
OpenAI-compatible route, timed per request with perf_counter_ns:

    ticket = await enforcer.admit(principal, route=route, prompt_tokens=50, max_tokens=200)
    reservation = await ticket.reserve(route, 50, 200)       # the model call's reservation
    breaker = enforcer.breaker(route); breaker.before_call()  # the upstream's circuit breaker
    breaker.record_success()
    await ticket.settle(reservation, Usage(40, 120), route.cost(Usage(40, 120)))
    await ticket.close()

for three variants: "off" (the same loop awaiting four no-op coroutines: the loop's own cost),
"memory" (MemoryLimiter, the default) and "redis" (ResilientLimiter over RedisLimiter on
redis://127.0.0.1:6379/0). The key never gets refused (rpm 10,000,000, tpm 10^12, a monthly budget of
10^9 USD so the budget path runs too); each run uses a fresh random key id, so its Redis keys collide
with no other run or test, and deletes them at the end. Requests run one at a time, then from 64
coroutines at once; the variants take turns in --rounds rounds so that drift hits all of them alike.
The event loop is uvloop, as under `pacemaker serve`.

Part B (end to end). The fake upstream and three `pacemaker serve` processes (SQLite, one worker
each), all started up front and driven one at a time, in turns, by a closed-loop aiohttp client in
this process: non-stream POST /v1/chat/completions, concurrency 1 then 32, --seconds each after a
1 s warm-up, in --rounds rounds; each figure is the median of its rounds'. Loading one server at a
time is fairer on a small machine than loading all three at once, where they would fight for the
same cores; an idle server costs next to nothing. With two or more CPUs the server under test is
pinned to CPU 0 and everything else of ours (the load generator, the fake upstream, the idle
servers) to CPU 1 (--no-pin turns it off).

Both parts check that the Redis variant really ran on Redis (its key's budget is found there, no
backend error, the ResilientLimiter not degraded) and delete their Redis keys. Child processes are
stopped on every exit, also on an error, Ctrl-C, SIGTERM or SIGHUP.

--smoke runs both parts and the profile with the smallest counts and durations, unpinned (seconds;
figures mean nothing). Either way the exit status is 1 if a request failed, a row is missing or a
figure could not be computed. Everything printed on stdout is markdown, ready for the README;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import itertools
import json
import math
import os
import platform
import pstats
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psutil
from redis.asyncio import Redis

from app.auth.principal import KeyLimits, Principal
from app.config import Settings, load_settings
from app.enforcement.enforcer import Enforcer
from app.enforcement.redis_limiter import RedisLimiter, build_redis
from app.enforcement.resilient_limiter import ResilientLimiter
from app.lifespan import build_enforcer
from app.observability.metrics import Metrics
from app.providers.base import Usage
from app.providers.registry import ModelRoute, ProviderRegistry
from benchmarks.harness import (
    HOST,
    ROOT,
    Child,
    can_pin,
    clean_up,
    exit_status,
    fmt,
    log,
    new_loop,
    not_finite,
    pacemaker_cli,
    percentile,
    pin_under_test,
    serve_pacemaker,
    start_fake_upstream,
    terminate_on_sigterm,
    verdict,
    write_config,
)
from benchmarks.loadgen import Window, closed_loop, first_request

REDIS_URL = "redis://127.0.0.1:6379/0"
MODEL = "fake-model"
PATH = "/v1/chat/completions"

PROMPT_TOKENS = 50
MAX_TOKENS = 200
USAGE = Usage(40, 120)
CONCURRENCY_A = 64
WARMUP_REQUESTS = 1000

# Never refused, and every dimension (requests, tokens, budget) does its work.
RPM = 10_000_000
TPM = 2_000_000_000  # never binds here; the key columns are 32-bit on PostgreSQL
BUDGET_USD = Decimal(10**9)
BUDGET_PERIOD = "month"
MAX_CONCURRENCY = 1000

# Targets of the issue: added p50 per request, in-process and with Redis.
TARGET_ADDED_P50_MS = {"memory": 0.5, "redis": 1.0}

E2E_CONCURRENCY = (1, 32)
E2E_BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name twelve Greek letters, please."},
        ],
        # Explicit, so every server reserves the same tokens (with a budget the route would cap to 1024).
        "max_tokens": MAX_TOKENS,
    }
)


def signed(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:+,.{digits}f}"


@dataclass
class Sample:
    """Latencies of one variant in one mode, pooled over rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    round_p50_us: list[float] = field(default_factory=list)
    _sorted: list[int] | None = None

    def add(self, latencies_ns: list[int], wall_s: float) -> None:
        self.round_p50_us.append(percentile(sorted(latencies_ns), 50) / 1000)
        self.latencies_ns.extend(latencies_ns)
        self.wall_s += wall_s
        self._sorted = None

    def us(self, q: float) -> float:
        if self._sorted is None:
            self._sorted = sorted(self.latencies_ns)
        return percentile(self._sorted, q) / 1000

    @property
    def mean_us(self) -> float:
        return sum(self.latencies_ns) / len(self.latencies_ns) / 1000 if self.latencies_ns else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies_ns) / self.wall_s if self.wall_s else float("nan")


# ---------------------------------------------------------------------------------------------
# Part A: the chain in process

Chain = Callable[[], Awaitable[None]]


def bench_settings(redis_url: str | None) -> Settings:
    """Settings as a deployment would have them: the simulated models plus fake-model with prices."""
    limits: dict[str, Any] = {"redis_url": redis_url} if redis_url else {}
    return load_settings(
        providers={
            "simulated": {"kind": "simulated", "tokens_per_second": 0},
            # Never called: Part A only needs the route (its name and prices) and its breaker.
            "fake": {"kind": "openai", "base_url": f"http://{HOST}:9/v1", "api_key": "sk-bench"},
        },
        models={
            **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
            MODEL: {
                "provider": "fake",
                "upstream_model": "fake-upstream-model",
                "input_usd_per_mtok": "1.0",
                "output_usd_per_mtok": "2.0",
            },
        },
        limits=limits,
    )


def bench_principal(key_id: int) -> Principal:
    limits = KeyLimits(
        rpm=RPM, tpm=TPM, max_concurrency=MAX_CONCURRENCY, budget_usd=BUDGET_USD, budget_period=BUDGET_PERIOD
    )
    return Principal(key_id=key_id, name="bench", prefix="pk_bench", limits=limits)


def enforcement_chain(enforcer: Enforcer, principal: Principal, route: ModelRoute) -> Chain:
    """What the non-stream chat route and ModelCall do with the enforcer for one request and one model call."""

    async def once() -> None:
        ticket = await enforcer.admit(principal, route=route, prompt_tokens=PROMPT_TOKENS, max_tokens=MAX_TOKENS)
        try:
            reservation = await ticket.reserve(route, PROMPT_TOKENS, MAX_TOKENS)
            breaker = enforcer.breaker(route)
            breaker.before_call()
            breaker.record_success()
            await ticket.settle(reservation, USAGE, route.cost(USAGE))
        finally:
            await ticket.close()

    return once


async def _noop() -> None:
    return None


async def off_chain() -> None:
    """Enforcement off: the same four awaits (admit, reserve, settle, close), doing nothing."""
    await _noop()
    await _noop()
    await _noop()
    await _noop()


def ping_chain(redis: Redis) -> Chain:
    async def once() -> None:
        # The chain waits for one round trip (admit; the settle runs off the request's way): its floor.
        await redis.ping()

    return once


async def run_sequential(chain: Chain, n: int) -> tuple[list[int], float]:
    clock = time.perf_counter_ns
    latencies = [0] * n
    start = clock()
    for i in range(n):
        t0 = clock()
        await chain()
        latencies[i] = clock() - t0
    return latencies, (clock() - start) / 1e9


async def run_concurrent(chain: Chain, n: int, concurrency: int) -> tuple[list[int], float]:
    """`concurrency` coroutines, each sending n / concurrency requests back to back.

    Each yields to the loop between its requests (outside the timed part), so that the coroutines
    interleave as requests in a server do even when the chain itself never suspends.
    """
    clock = time.perf_counter_ns
    latencies: list[int] = []
    per_worker = max(1, n // concurrency)

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = clock()
            await chain()
            latencies.append(clock() - t0)
            await asyncio.sleep(0)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, (clock() - start) / 1e9


@dataclass
class InProcess:
    chains: dict[str, Chain]
    labels: dict[str, str]
    sequential: dict[str, Sample]
    concurrent: dict[str, Sample]
    checks: list[str]
    profiles: dict[str, str]


async def part_a(requests: int, rounds: int, profile_requests: int) -> InProcess:
    for name in [v for v in os.environ if v.startswith("PACEMAKER_")]:
        del os.environ[name]  # this process only: a developer's config must not change the figures
    key_id = 2**40 + secrets.randbelow(2**40)  # fresh Redis keys, shared with no other run or test
    principal = bench_principal(key_id)
    memory_settings, redis_settings = bench_settings(None), bench_settings(REDIS_URL)
    redis = build_redis(REDIS_URL)
    redis_keys = RedisLimiter(redis).keys_for(key_id)  # the default prefix, as build_enforcer uses
    try:
        try:
            await redis.ping()
        except Exception as exc:
            raise RuntimeError(f"Redis is not reachable at {REDIS_URL}: {exc}") from exc
        route = ProviderRegistry(memory_settings).route(MODEL)
        memory_metrics, redis_metrics = Metrics(), Metrics()
        memory = build_enforcer(memory_settings, memory_metrics, None)
        shared = build_enforcer(redis_settings, redis_metrics, redis)
        assert isinstance(shared.limiter, ResilientLimiter)
        chains: dict[str, Chain] = {
            "off": off_chain,
            "memory": enforcement_chain(memory, principal, route),
            "redis": enforcement_chain(shared, principal, route),
            "ping": ping_chain(redis),
        }
        labels = {
            "off": "enforcement off (4 no-op awaits)",
            "memory": "in-process limits (MemoryLimiter)",
            "redis": "Redis limits (ResilientLimiter + RedisLimiter)",
            "ping": "(reference) 1 Redis PING, no enforcement",
        }
        for name, chain in chains.items():
            log(f"part A: warm-up {name}")
            await run_sequential(chain, WARMUP_REQUESTS)
        sequential = {name: Sample() for name in chains}
        concurrent = {name: Sample() for name in chains}
        per_round = max(CONCURRENCY_A, requests // rounds)
        for round_no in range(1, rounds + 1):
            for name, chain in chains.items():
                gc.collect()
                sequential[name].add(*await run_sequential(chain, per_round))
                gc.collect()
                concurrent[name].add(*await run_concurrent(chain, per_round, CONCURRENCY_A))
            log(
                f"part A round {round_no}/{rounds}: p50 µs sequential "
                + ", ".join(f"{name} {sequential[name].us(50):.1f}" for name in chains)
            )

        await shared.settled()  # the settlements still in flight (they run off the request's way)
        checks = []
        errors = _sample_total(redis_metrics, "pacemaker_limiter_backend_errors_total")
        budget_spent = await redis.hget(redis_keys[2], "spent")
        checks.append(
            f"Redis limiter: {int(errors)} backend errors, degraded={shared.limiter.degraded},"
            f" budget spent in Redis {int(budget_spent or 0) / 1e9:.6f} USD for key id {key_id}"
        )
        if errors or shared.limiter.degraded or not budget_spent:
            raise RuntimeError("the Redis variant did not run on Redis: " + checks[-1])
        for name, enforcer in (("memory", memory), ("redis", shared)):
            if enforcer.concurrency.in_flight:
                raise RuntimeError(f"{name}: {enforcer.concurrency.in_flight} concurrency slots leaked")
            if _sample_total(enforcer.metrics, "pacemaker_rejections_total"):
                raise RuntimeError(f"{name}: requests were refused")

        profiles: dict[str, str] = {}
        for name in ("memory", "redis") if profile_requests else ():
            log(f"part A: cProfile of {name}, {profile_requests} sequential requests")
            profiles[name] = await profile_chain(chains[name], profile_requests)
        await memory.limiter.aclose()
        await shared.limiter.aclose()
        return InProcess(chains, labels, sequential, concurrent, checks, profiles)
    finally:
        with contextlib.suppress(Exception):
            await redis.delete(*redis_keys)
        await redis.aclose()


def _sample_total(metrics: Metrics, sample: str) -> float:
    """A counter's total over all its labels."""
    return sum(s.value for metric in metrics.registry.collect() for s in metric.samples if s.name == sample)


async def profile_chain(chain: Chain, n: int, top: int = 14) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await run_sequential(chain, n)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler)
    entries: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values())
    rows = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [
        f"cProfile, {n:,} sequential requests; {total / n * 1e6:.1f} µs of profiled CPU per request"
        " (cProfile itself inflates every call, so read the shares, not the absolute times; calls/req counts"
        " each resumption of a coroutine as a call).",
        "",
        "| self % | self µs/req | cumulative µs/req | calls/req | function | where |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for (filename, line, func), (_cc, calls, tt, ct, _callers) in rows:
        where = _short_path(filename) + (f":{line}" if line else "")
        lines.append(
            f"| {100 * tt / total:.1f} | {tt / n * 1e6:.2f} | {ct / n * 1e6:.2f} | {calls / n:.2f}"
            f" | `{func}` | {where} |"
        )
    return "\n".join(lines) + "\n"


def _short_path(filename: str) -> str:
    if filename == "~":
        return "(built-in)"
    path = Path(filename)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    parts = path.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return "/".join(parts[-2:])


def render_part_a(result: InProcess, requests: int, rounds: int) -> str:
    seq, conc, labels = result.sequential, result.concurrent, result.labels
    off_seq, off_conc = seq["off"], conc["off"]
    lines = [
        "### A. Enforcement chain in process (admit, reserve, breaker, settle, close)",
        "",
        f"{len(seq['off'].latencies_ns):,} requests per row ({requests:,} requested, {rounds} rounds taken in"
        f" turns after {WARMUP_REQUESTS:,} warm-up requests), one key never refused: rpm {RPM:,}, tpm 10^12,"
        f" budget 10^9 USD per {BUDGET_PERIOD}; prompt {PROMPT_TOKENS} + max {MAX_TOKENS} tokens reserved,"
        f" {USAGE.prompt_tokens} + {USAGE.completion_tokens} settled. Times in µs over all rounds' requests;"
        " added = variant - off.",
        "",
        "**Sequential (concurrency 1)**",
        "",
        "| variant | p50 µs | p99 µs | mean µs | added p50 µs | added p99 µs | added mean µs | p50 µs, each round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sample in seq.items():
        lines.append(
            f"| {labels[name]} | {fmt(sample.us(50), 1)} | {fmt(sample.us(99), 1)} | {fmt(sample.mean_us, 1)}"
            f" | {signed(sample.us(50) - off_seq.us(50))} | {signed(sample.us(99) - off_seq.us(99))}"
            f" | {signed(sample.mean_us - off_seq.mean_us)} | {' / '.join(fmt(x, 1) for x in sample.round_p50_us)} |"
        )
    lines += [
        "",
        f"**{CONCURRENCY_A} concurrent coroutines** (each yields to the loop between its requests;"
        " µs/req = wall time / requests, the loop's CPU per request)",
        "",
        "| variant | req/s | µs/req | p50 µs | p99 µs | added µs/req | added p50 µs | added p99 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sample in conc.items():
        per_request = 1e6 / sample.rps
        lines.append(
            f"| {labels[name]} | {fmt(sample.rps, 0)} | {fmt(per_request, 1)} | {fmt(sample.us(50), 1)}"
            f" | {fmt(sample.us(99), 1)} | {signed(per_request - 1e6 / off_conc.rps)}"
            f" | {signed(sample.us(50) - off_conc.us(50))} | {signed(sample.us(99) - off_conc.us(99))} |"
        )
    lines += ["", *(f"Check: {check}." for check in result.checks), ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Part B: end to end


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    limits: dict[str, Any]  # the config's `limits` section
    key_args: tuple[str, ...]  # `pacemaker keys create` options


UNLIMITED_KEY = (
    *("--rpm", str(RPM), "--tpm", str(TPM), "--budget-usd", str(BUDGET_USD), "--budget-period", BUDGET_PERIOD),
    *("--max-concurrency", str(MAX_CONCURRENCY)),
)
SERVERS = (
    # The chain always runs; with every limit dimension None the in-process limiter does the least
    # it can (no bucket, no budget, no Redis): only the concurrency slot, the breaker and the calls.
    ServerSpec(
        "off",
        "off (rpm, tpm, budget unlimited)",
        {"rpm": None, "tpm": None, "budget_usd": None},
        ("--max-concurrency", str(MAX_CONCURRENCY)),
    ),
    ServerSpec("memory", "in-process limits", {}, UNLIMITED_KEY),
    ServerSpec("redis", "Redis limits", {"redis_url": REDIS_URL}, UNLIMITED_KEY),
)


@dataclass
class Server:
    spec: ServerSpec
    child: Child
    api_key: str
    key_id: int


def start_server(spec: ServerSpec, workdir: Path, upstream_port: int, children: list[Child]) -> Server:
    """`pacemaker serve` configured like tests/support.py's server_config, with a key that is never refused."""
    workdir.mkdir(parents=True)
    db = workdir / "pacemaker.db"
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{db}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        "server": {"access_log": False},
        "providers": {
            "simulated": {"kind": "simulated", "tokens_per_second": 0},
            "fake": {
                "kind": "openai",
                "base_url": f"http://{HOST}:{upstream_port}/v1",
                "api_key": "sk-fake",
                "read_timeout_s": 5,
            },
        },
        "models": {
            **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
            MODEL: {
                "provider": "fake",
                "upstream_model": "fake-upstream-model",
                "input_usd_per_mtok": "1.0",
                "output_usd_per_mtok": "2.0",
            },
        },
        "limits": spec.limits,
    }
    env = write_config(workdir / "pacemaker.yaml", config)
    pacemaker_cli(env, "migrate")
    created = json.loads(pacemaker_cli(env, "keys", "create", "--name", f"bench-{spec.key}", "--json", *spec.key_args))
    # A fresh random key id: the Redis limiter keys by id, and this run must share no Redis key with
    # another run or a test server (whose databases also start at id 1). The database is ours alone.
    key_id = 2**40 + secrets.randbelow(2**40)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE api_key SET id = ? WHERE id = ?", (key_id, created["id"]))
    child = serve_pacemaker(f"pacemaker ({spec.key})", env, workdir / "pacemaker.log", children)
    return Server(spec, child, created["key"], key_id)


@dataclass(kw_only=True)
class Run(Window):
    server: str
    concurrency: int

    @property
    def other_cpu_percent(self) -> float:
        return 100 * self.other_cpu_s / self.window_s if self.window_s else float("nan")


@dataclass
class Row:
    """One server at one concurrency over the rounds: each figure is the median of its rounds' figures,
    so that a round disturbed by other work on the machine does not move the row."""

    rounds: list[Run] = field(default_factory=list)

    def median(self, figure: Callable[[Run], float]) -> float:
        return statistics.median(figure(run) for run in self.rounds)

    def all(self, figure: Callable[[Run], float], digits: int) -> str:
        return " / ".join(fmt(figure(run), digits) for run in self.rounds)

    @property
    def p50(self) -> float:
        return self.median(lambda run: run.percentile(50))

    @property
    def p99(self) -> float:
        return self.median(lambda run: run.percentile(99))

    @property
    def rps(self) -> float:
        return self.median(lambda run: run.rps)

    @property
    def cpu(self) -> float:
        return self.median(lambda run: run.server_cpu_ms_per_request)


def e2e_valid(status: int, body: bytes) -> bool:
    return status == 200 and b'"choices"' in body


async def drive(server: Server, concurrency: int, warmup_s: float, seconds: float, children: Sequence[Child]) -> Run:
    """Closed loop: `concurrency` workers back to back; requests completed inside the window count."""
    url = f"http://{HOST}:{server.child.port}{PATH}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    run = Run(server=server.spec.key, concurrency=concurrency)
    return await closed_loop(
        run, url, E2E_BODY, headers, e2e_valid, concurrency, warmup_s, seconds, server.child, children
    )


async def probe(server: Server) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    url = f"http://{HOST}:{server.child.port}{PATH}"
    await first_request(server.child.name, url, E2E_BODY, headers, e2e_valid, server.child)


async def redis_spent(key_id: int) -> float | None:
    """The budget the Redis server charged to its key (proof the limiter used Redis); deletes the keys."""
    redis = build_redis(REDIS_URL)
    try:
        keys = RedisLimiter(redis).keys_for(key_id)
        spent = await redis.hget(keys[2], "spent")
        await redis.delete(*keys)
        return None if spent is None else int(spent) / 1e9
    finally:
        await redis.aclose()


def part_b(
    runner: asyncio.Runner, args: argparse.Namespace, pinning: bool, children: list[Child], workdir: Path
) -> tuple[dict[tuple[str, int], Row], list[str]]:
    rounds = args.rounds
    fake = start_fake_upstream(workdir, children)
    servers: list[Server] = []
    try:
        for spec in SERVERS:
            log(f"part B: starting pacemaker ({spec.key})")
            servers.append(start_server(spec, workdir / spec.key, fake.port, children))
        for server in servers:
            runner.run(probe(server))
        rows: dict[tuple[str, int], Row] = {}
        for round_no in range(1, rounds + 1):
            for concurrency in E2E_CONCURRENCY:
                for server in servers:
                    if pinning:
                        pin_under_test(server.child, children)
                    run = runner.run(drive(server, concurrency, args.warmup, args.seconds, children))
                    rows.setdefault((server.spec.key, concurrency), Row()).rounds.append(run)
                    log(
                        f"part B round {round_no}/{rounds} c={concurrency:<3} {server.spec.key:7}"
                        f" {run.rps:,.0f} req/s, p50 {run.percentile(50):.2f} ms, p99 {run.percentile(99):.2f} ms,"
                        f" {sum(run.errors.values())} errors"
                    )
        checks = []
        for server in servers:
            if server.spec.key == "redis":
                spent = runner.run(redis_spent(server.key_id))
                checks.append(
                    f"the Redis server charged {spent or 0:.6f} USD to its key in Redis (key id {server.key_id})"
                )
                if not spent:
                    raise RuntimeError("the Redis server did not keep its budget in Redis")
        return rows, checks
    finally:
        if pinning:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, set(range(psutil.cpu_count() or 1)))
        for server in servers:
            if server.spec.key == "redis":
                with contextlib.suppress(Exception):
                    runner.run(redis_spent(server.key_id))


def render_part_b(rows: dict[tuple[str, int], Row], checks: list[str], args: argparse.Namespace, pinning: bool) -> str:
    cpus = psutil.cpu_count()
    placement = (
        "server under test pinned to CPU 0; load generator, fake upstream and idle servers to CPU 1"
        if pinning
        else "not pinned"
    )
    labels = {spec.key: spec.label for spec in SERVERS}
    lines = [
        "### B. End to end: non-stream POST /v1/chat/completions through the fake upstream",
        "",
        f"Three `pacemaker serve` (one worker, SQLite) started together and driven one at a time, in turns;"
        f" {args.rounds} round(s) of {args.warmup:g} s warm-up + {args.seconds:g} s measured per row; every figure is"
        f" the median of the rounds' figures; {cpus} CPUs, {placement}; closed-loop aiohttp client on uvloop;"
        f" max_tokens {MAX_TOKENS}; 12-token answers. Δ = server - off.",
        "",
        "| concurrency | server | req/s | p50 ms | p99 ms | server CPU ms/req | Δ req/s % | Δ p50 ms | Δ p99 ms"
        " | Δ CPU ms/req | p50 ms, each round | other CPU %, each round | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in E2E_CONCURRENCY:
        off = rows[("off", concurrency)]
        for spec in SERVERS:
            row = rows[(spec.key, concurrency)]
            errors = sum(sum(run.errors.values()) for run in row.rounds)
            lines.append(
                f"| {concurrency} | {labels[spec.key]} | {fmt(row.rps, 0)} | {fmt(row.p50, 2)} | {fmt(row.p99, 2)}"
                f" | {fmt(row.cpu, 3)} | {signed(100 * (row.rps / off.rps - 1))} | {signed(row.p50 - off.p50, 2)}"
                f" | {signed(row.p99 - off.p99, 2)} | {signed(row.cpu - off.cpu, 3)}"
                f" | {row.all(lambda run: run.percentile(50), 2)} | {row.all(lambda run: run.other_cpu_percent, 0)}"
                f" | {errors} |"
            )
    lines += [
        "",
        '"off" cannot switch the chain off: it is a server whose limits are all unlimited (rpm, tpm and'
        " budget None, no Redis), so the limiter keeps no bucket and no budget; the concurrency slot, the"
        " breaker and the limiter's calls still run. The others use a key with rpm 10,000,000, tpm 10^12"
        f" and 10^9 USD per {BUDGET_PERIOD}, which never refuses but does all the work. Other CPU % is busy"
        " CPU outside this benchmark's processes (Redis itself, kernel network work, anything else running)"
        " in % of one core: a round with much more of it than its neighbours was disturbed.",
        "",
        *(f"Check: {check}." for check in checks),
        "",
    ]
    for row in rows.values():
        for run in row.rounds:
            for error, count in run.errors.most_common(3):
                lines.append(f"- {run.server} c={run.concurrency}: {count} x {error}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def render_targets(part: InProcess | None, rows: dict[tuple[str, int], Row] | None) -> str:
    lines = ["### Targets", "", "| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for name, limit in TARGET_ADDED_P50_MS.items():
        what = "in-process limits" if name == "memory" else "Redis limits"
        if part is not None:
            added = (part.sequential[name].us(50) - part.sequential["off"].us(50)) / 1000
            lines.append(
                f"| added p50, {what}, in process, sequential | {added:.3f} ms | <= {limit} ms"
                f" | {verdict(added <= limit)} |"
            )
        if rows is not None:
            added = rows[(name, 1)].p50 - rows[("off", 1)].p50
            lines.append(
                f"| added p50, {what}, end to end, c=1 (noisier) | {added:.3f} ms | <= {limit} ms"
                f" | {verdict(added <= limit)} |"
            )
    return "\n".join(lines) + "\n"


def problems(part: InProcess | None, rows: dict[tuple[str, int], Row] | None, rounds: int) -> list[str]:
    """What makes the figures meaningless: a request failed, a row is missing, a figure could not be computed."""
    found = []
    if part is not None:
        for mode, samples in (("sequential", part.sequential), ("concurrent", part.concurrent)):
            for name, sample in samples.items():
                figures = {"p50": sample.us(50), "p99": sample.us(99), "mean": sample.mean_us, "req/s": sample.rps}
                found += [f"part A, {name}, {mode}: {figure} could not be computed" for figure in not_finite(figures)]
    if rows is not None:
        for spec, concurrency in itertools.product(SERVERS, E2E_CONCURRENCY):
            runs = rows.get((spec.key, concurrency), Row()).rounds
            label = f"part B, {spec.key}, c={concurrency}"
            if len(runs) != rounds:
                found.append(f"{label}: {len(runs)} of {rounds} rounds measured")
            found += [problem for i, run in enumerate(runs, 1) for problem in run.problems(f"{label}, round {i}")]
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="part A: requests per variant and mode")
    parser.add_argument("--seconds", type=float, default=5.0, help="part B: measured seconds per row (default 5)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="part B: unmeasured seconds before each row (default 1)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="variants take turns this many times (default 3)")
    parser.add_argument("--parts", default="ab", choices=["a", "b", "ab"], help="which parts to run (default ab)")
    parser.add_argument("--profile", action="store_true", help="part A: add a cProfile of the memory and redis chains")
    parser.add_argument("--no-pin", action="store_true", help="part B: do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="part B: keep the temporary directory (logs, databases)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every part and the profile, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.rounds, args.seconds, args.warmup, args.no_pin, args.profile = 1000, 1, 0.5, 0.2, True, True
    if not (1_000 <= args.requests <= 2_000_000 and 0.5 <= args.seconds <= 120 and 1 <= args.rounds <= 10):
        parser.error("--requests must be in [1000, 2000000], --seconds in [0.5, 120], --rounds in [1, 10]")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be in [0, 60]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join([".venv/bin/python -m benchmarks.enforcement", *(sys.argv[1:] if argv is None else argv)])
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-enforcement-bench-"))
    children: list[Child] = []
    part: InProcess | None = None
    rows: dict[tuple[str, int], Row] | None = None
    failures: list[str] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"## Enforcement overhead\n\n`{command}`\n")
            print(
                f"{platform.python_implementation()} {platform.python_version()}, uvloop, {psutil.cpu_count()} CPUs,"
                f" Redis at {REDIS_URL}; load average before the run {load}.\n"
            )
            if "a" in args.parts:
                profile_requests = (200 if args.smoke else max(2000, args.requests // 4)) if args.profile else 0
                part = runner.run(part_a(args.requests, args.rounds, profile_requests))
                print(render_part_a(part, args.requests, args.rounds))
            if "b" in args.parts:
                rows, checks = part_b(runner, args, pinning, children, workdir)
                print(render_part_b(rows, checks, args, pinning))
            failures += problems(part, rows, args.rounds)
            print(render_targets(part, rows))
            if part is not None and part.profiles:
                for name, table in part.profiles.items():
                    print(f"#### Where the in-process chain's time goes: {part.labels[name]}\n\n{table}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
