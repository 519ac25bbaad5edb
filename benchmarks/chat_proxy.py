"""Benchmark POST /v1/chat/completions: the fake upstream alone, a bare aiohttp proxy, and Pacemaker.

    .venv/bin/python -m benchmarks.chat_proxy [--seconds 5] [--warmup 1] [--profile 10] [--smoke]
        [--backends embedded,postgres-redis] [--tokens 100] [--compare LABEL=DIR]

Starts these servers on 127.0.0.1, one uvicorn (or aiohttp) worker each:

  upstream    the fake OpenAI upstream (tests/fakes/upstream.py), called directly
  bare proxy  benchmarks/bare_proxy.py: FastAPI + one shared aiohttp session, the Python ceiling
  Pacemaker   `pacemaker serve`, one model on the fake upstream, once per --backends entry:
              embedded        SQLite in a temporary directory, limits in process (the defaults)
              postgres-redis  a fresh database on the PostgreSQL at 127.0.0.1:5432 (audit rows and
                              task records there, dropped at the end) and limits in a redis-server
                              of the benchmark's own (limits.redis_url; never the machine's shared one)

and drives each with a load generator in this process (asyncio + aiohttp, uvloop) for a fixed time
per scenario after a warm-up: JSON at concurrency 1 and 64, SSE (with the usage chunk) at 64 with
12-token answers and with --tokens-token answers, and Pacemaker's `POST /v1/tasks` with `stream: true`
at 64 with --tokens-token answers (only Pacemaker has that route: its CPU per event is compared with
the bare proxy's chat SSE of the same length). The scenarios run one target after another, so that
each ratio compares runs close in time.

Server CPU per relayed event is the server's CPU over the window divided by the events relayed in
it: the upstream's chunks per stream (the role chunk, one per token, the finish chunk and the usage
chunk: tokens + 3; the fake upstream's #tokens=N directive sets N) times the streams completed.

With two or more CPUs the process under test is pinned to CPU 0 and everything else (the load
generator, and the fake upstream when it is not the one measured) to CPU 1, so the figures say what
one core of server buys; --no-pin turns that off. Server CPU is the server process's user+system
time over the measured window (psutil), divided by the requests completed in it.

--profile N adds, after the measurements, an N-second py-spy recording (--gil: Python CPU time) of
Pacemaker under the JSON c=64 load, or --profile-scenario's, not counted in the table, and prints
where its CPU goes. py-spy is not a project dependency: `.venv/bin/pip install py-spy` first.

--compare LABEL=DIR (repeatable) adds a Pacemaker (embedded, or --compare-backend's) served from another
checkout's code, e.g. `git worktree add --detach /tmp/wt/base <commit>`, measured in the same rounds:
before/after figures from one run, each as the median of its rounds' paired ratios to the bare proxy.

--smoke runs every row once for a fraction of a second, unpinned (seconds; figures mean nothing).
Either way the exit status is 1 if a row is missing, had a failed request, or has a figure that
could not be computed. Everything printed on stdout is markdown, ready for the README; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil

from benchmarks import pyspy
from benchmarks.harness import (
    HOST,
    ROOT,
    Child,
    can_pin,
    child_env,
    clean_up,
    exit_status,
    fmt,
    free_port,
    log,
    new_loop,
    pacemaker_cli,
    pin_under_test,
    serve_pacemaker,
    start_fake_upstream,
    start_redis,
    terminate_on_sigterm,
    verdict,
    write_config,
)
from benchmarks.loadgen import Window, closed_loop, first_request

PATH = "/v1/chat/completions"
TASKS_PATH = "/v1/tasks"
MODEL = "fake-model"
PG_HOSTPORT = "127.0.0.1:5432"
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOSTPORT}/test"
DB_PREFIX = "pacemaker_bench_chat_"
BACKENDS = {"embedded": "", "postgres-redis": "PostgreSQL + Redis"}

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name twelve Greek letters, please."},
]
QUERY = "Name twelve Greek letters, please."
# Issue 13's targets. The c=1 added p50 here compares rows seconds apart; benchmarks.latency_ab
# interleaves the targets request by request, which a shared machine's noise cannot tilt.
TARGET_CHECKS = {"pacemaker_vs_bare_rps_c64": 0.75, "pacemaker_added_p50_ms_c1": 0.2, "cpu_per_event_vs_bare": 1.3}


# ---------------------------------------------------------------------------------------------
# Child processes


def start_bare_proxy(workdir: Path, upstream_port: int, children: list[Child]) -> Child:
    port = free_port()
    upstream = f"http://{HOST}:{upstream_port}/v1"
    args = [sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(port), "--upstream", upstream]
    children.append(child := Child("bare proxy", args, child_env(), workdir / "bare-proxy.log", port))
    child.wait_for_port()
    return child


def start_pacemaker(
    workdir: Path,
    upstream_port: int,
    children: list[Child],
    *,
    name: str = "pacemaker",
    database_url: str | None = None,
    redis_url: str | None = None,
    code: Path = ROOT,
) -> tuple[Child, str]:
    """Pacemaker as `make run` would serve it, on a fresh database (SQLite unless given); it and an API key."""
    home = workdir / name
    home.mkdir()
    limits: dict[str, Any] = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "max_concurrency": 4096}
    if redis_url is not None:
        limits["redis_url"] = redis_url
    config: dict[str, Any] = {
        "database": {"url": database_url or f"sqlite+aiosqlite:///{home / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(home / "dev-key")},
        "server": {"access_log": False},
        # Journals of its own (not ./var, which other servers on this machine may use).
        "audit": {"spool_dir": str(home / "audit-spool")},
        "tasks": {"spool_dir": str(home / "task-spool")},
        # Enforcement stays on (its cost is part of what is measured) with limits the load never reaches.
        "limits": limits,
        "providers": {
            "simulated": {"kind": "simulated", "tokens_per_second": 0},
            "fake": {"kind": "openai", "base_url": f"http://{HOST}:{upstream_port}/v1", "api_key": "sk-bench"},
        },
        "models": {
            **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
            MODEL: {"provider": "fake", "input_usd_per_mtok": "1.0", "output_usd_per_mtok": "2.0"},
        },
    }
    env = write_config(home / "pacemaker.yaml", config)
    pacemaker_cli(env, "migrate", cwd=code)
    key: str = json.loads(pacemaker_cli(env, "keys", "create", "--name", "bench", "--json", cwd=code))["key"]
    return serve_pacemaker(name, env, home / "pacemaker.log", children, cwd=code), key


def start_pacemaker_on(
    backend: str,
    databases: Databases,
    workdir: Path,
    upstream_port: int,
    children: list[Child],
    *,
    name: str,
    code: Path = ROOT,
) -> tuple[Child, str]:
    """start_pacemaker on `backend`: for postgres-redis, a database of `databases` and a redis-server of its own."""
    database_url = redis_url = None
    if backend == "postgres-redis":
        database_url = databases.create()
        redis_url = f"redis://{HOST}:{start_redis(workdir, children).port}/0"
    return start_pacemaker(
        workdir, upstream_port, children, name=name, database_url=database_url, redis_url=redis_url, code=code
    )


class Databases:
    """Fresh databases on the shared PostgreSQL server (Pacemaker migrates them); drop_all() drops them."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        """CREATE DATABASE; its SQLAlchemy URL. Call outside the event loop."""
        name = f"{DB_PREFIX}{secrets.token_hex(4)}"
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return f"postgresql+asyncpg://postgres@{PG_HOSTPORT}/{name}"

    def drop_all(self) -> None:
        while self.names:
            name = self.names.pop()
            try:
                asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as exc:  # say which one is left
                log(f"could not drop database {name}: {type(exc).__name__}: {exc}")


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def postgres_and_redis_available() -> bool:
    host, port = PG_HOSTPORT.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            pass
    except OSError:
        return False
    return shutil.which("redis-server") is not None


# ---------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    base_url: str
    headers: dict[str, str]
    server: Child  # whose CPU is charged to the requests
    backend: str = ""  # Pacemaker's: a key of BACKENDS

    @property
    def pacemaker(self) -> bool:
        return bool(self.backend)


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    concurrency: int
    stream: bool
    tokens: int | None = None  # the answer's length (the fake upstream's #tokens=N); None: its default, 12
    route: str = "chat"  # or "tasks": POST /v1/tasks with stream true (Pacemaker only)

    @property
    def path(self) -> str:
        return TASKS_PATH if self.route == "tasks" else PATH

    @property
    def events_per_stream(self) -> int:
        """The upstream's chunks per stream: role, one per token, finish, usage."""
        return (self.tokens or 12) + 3 if self.stream else 0

    def runs_on(self, target: Target) -> bool:
        return self.route == "chat" or target.pacemaker

    def body(self) -> bytes:
        query = QUERY if self.tokens is None else f"{QUERY} #tokens={self.tokens}"
        if self.route == "tasks":
            return orjson.dumps({"query": query, "model": MODEL, "stream": True})
        payload: dict[str, Any] = {"model": MODEL, "messages": [MESSAGES[0], {"role": "user", "content": query}]}
        if self.stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        return orjson.dumps(payload)

    def valid(self, status: int, body: bytes) -> bool:
        if status != 200:
            return False
        if self.route == "tasks":
            return b"event: task.completed\n" in body and b"event: task.failed" not in body
        if self.stream:
            return body.endswith(b"data: [DONE]\n\n") and b'"usage"' in body
        return b'"choices"' in body and b"alpha" in body


@dataclass(kw_only=True)
class Result(Window):
    target: Target
    scenario: Scenario
    round_no: int = 1

    @property
    def server_cpu_us_per_event(self) -> float:
        """Server CPU over the window / the upstream events relayed in it (NaN for JSON rows)."""
        events = self.requests * self.scenario.events_per_stream
        return self.server_cpu_s * 1e6 / events if events else float("nan")


async def run_load(
    target: Target, scenario: Scenario, warmup_s: float, seconds: float, children: Sequence[Child]
) -> Result:
    """Closed-loop load: `concurrency` workers send back to back for warm-up + seconds."""
    headers = {"Content-Type": "application/json", **target.headers}
    run = Result(target=target, scenario=scenario)
    body, valid = scenario.body(), scenario.valid
    url = target.base_url + scenario.path
    return await closed_loop(
        run, url, body, headers, valid, scenario.concurrency, warmup_s, seconds, target.server, children
    )


async def probe(target: Target, scenario: Scenario) -> None:
    """One request per scenario before any load: a broken setup fails here, with the server's log."""
    headers = {"Content-Type": "application/json", **target.headers}
    label = f"{target.label}, {scenario.label}"
    url = target.base_url + scenario.path
    await first_request(label, url, scenario.body(), headers, scenario.valid, target.server)


# ---------------------------------------------------------------------------------------------
# Report


def medians(results: Sequence[Result]) -> dict[tuple[str, str], tuple[Result, list[float]]]:
    """Per (target, scenario): the round with the median req/s, and every round's req/s."""
    rounds: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        rounds.setdefault((r.target.key, r.scenario.key), []).append(r)
    chosen = {}
    for key, runs in rounds.items():
        ordered = sorted(runs, key=lambda r: r.rps)
        chosen[key] = (ordered[(len(ordered) - 1) // 2], [r.rps for r in runs])
    return chosen


def render(results: Sequence[Result], args: argparse.Namespace, pinning: bool) -> str:
    rows = medians(results)
    rounds = f"median of {args.rounds} rounds by req/s" if args.rounds > 1 else "one round"
    lines = [
        "### POST /v1/chat/completions (and POST /v1/tasks streamed): fake upstream, bare aiohttp proxy, Pacemaker",
        "",
        f"{platform.python_implementation()} {platform.python_version()}, {psutil.cpu_count()} CPUs"
        f" ({'server under test pinned to CPU 0, load generator and the rest to CPU 1' if pinning else 'not pinned'}),"
        f" one worker per server, {args.warmup:g} s warm-up + {args.seconds:g} s measured per row, {rounds};"
        f" 12-token answers unless a row says otherwise ({args.tokens} tokens: {args.tokens + 3} upstream events"
        " per stream); closed-loop load generator: asyncio + aiohttp on uvloop.",
        "",
        "| scenario | target | req/s | req/s, all rounds | p50 ms | p99 ms | server CPU ms/req |"
        " server CPU us/event | server CPU % | loadgen CPU % | other CPU % | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (_target, _scenario), (r, all_rps) in rows.items():
        errors = sum(sum(x.errors.values()) for x in results if x.target is r.target and x.scenario is r.scenario)
        lines.append(
            f"| {r.scenario.label} | {r.target.label} | {fmt(r.rps, 0)} | {' / '.join(fmt(x, 0) for x in all_rps)}"
            f" | {fmt(r.percentile(50))} | {fmt(r.percentile(99))} | {fmt(r.server_cpu_ms_per_request, 3)}"
            f" | {fmt(r.server_cpu_us_per_event, 1) if r.scenario.stream else ''}"
            f" | {fmt(100 * r.server_cpu_s / r.window_s, 0)} | {fmt(100 * r.loadgen_cpu_s / r.window_s, 0)}"
            f" | {fmt(100 * r.other_cpu_s / r.window_s, 0)} | {errors} |"
        )
    lines += [
        "",
        "CPU % is of one core. Server CPU near 100 % means the worker is saturated; where the load generator is"
        " near 100 % instead, the row measures the client, not the server (the upstream called directly)."
        " Other CPU % is work on the machine outside this benchmark during the row: rows with much of it are noise.",
        "",
    ]

    def get(target: str, scenario: str) -> Result | None:
        found = rows.get((target, scenario))
        return found[0] if found else None

    checks: list[tuple[str, str, str, str]] = []
    for backend in args.backends:
        checks += _checks(get, backend, args.tokens, results)
    for label, _ in args.compare:
        for scenario in ("sse_long_c64", "tasks_sse_c64", "sse_c64"):
            ratios = paired_ratios(
                results, (f"compare_{label}", scenario), ("bare", scenario.replace("tasks_sse", "sse_long"))
            )
            if ratios:
                spread = " / ".join(fmt(x) for x in ratios)
                checks.append(
                    (
                        f"server CPU per relayed event, {SCENARIOS[scenario].label}: Pacemaker ({label}) / bare proxy's"
                        f" chat SSE, median of the rounds' ratios (rounds: {spread})",
                        fmt(statistics.median(ratios)),
                        "(info)",
                        "",
                    )
                )
    if checks:
        lines += ["| check | measured | target | verdict |", "|---|---:|---|---|"]
        lines += [f"| {name} | {value} | {target} | {outcome} |" for name, value, target, outcome in checks]
    failed = sum(sum(r.errors.values()) for r in results)
    if failed:
        lines += [
            "",
            f"**{failed} requests failed** (see the progress output on stderr): the rows with errors measure"
            " refusals, not the proxy, and the checks built on them are void.",
        ]
    return "\n".join(lines) + "\n"


def paired_ratios(results: Sequence[Result], pm: tuple[str, str], bare: tuple[str, str]) -> list[float]:
    """Per round, Pacemaker's CPU per event over the bare proxy's (rows of one round run minutes apart
    at most, so a ratio within a round is steadier than one between the median rows)."""
    by_round: dict[int, dict[tuple[str, str], Result]] = {}
    for r in results:
        by_round.setdefault(r.round_no, {})[(r.target.key, r.scenario.key)] = r
    ratios = []
    for rows in by_round.values():
        a, b = rows.get(pm), rows.get(bare)
        if a is not None and b is not None:
            ratios.append(a.server_cpu_us_per_event / b.server_cpu_us_per_event)
    return ratios


def _checks(get: Any, backend: str, tokens: int, results: Sequence[Result]) -> list[tuple[str, str, str, str]]:
    """The checks of one Pacemaker backend against the bare proxy (and the upstream) of the same run."""
    key = pacemaker_key(backend)
    on = f" ({BACKENDS[backend]})" if BACKENDS[backend] else ""
    checks: list[tuple[str, str, str, str]] = []
    pm, bare = get(key, "json_c64"), get("bare", "json_c64")
    if pm and bare:
        ratio = pm.rps / bare.rps if bare.rps else float("nan")
        limit = TARGET_CHECKS["pacemaker_vs_bare_rps_c64"]
        checks.append(
            (f"Pacemaker{on} / bare proxy req/s, JSON c=64", fmt(ratio), f">= {limit}", verdict(ratio >= limit))
        )
    pm, bare = get(key, "json_c1"), get("bare", "json_c1")
    if pm and bare:
        added = pm.percentile(50) - bare.percentile(50)
        limit = TARGET_CHECKS["pacemaker_added_p50_ms_c1"]
        checks.append(
            (f"Pacemaker{on} added p50, JSON c=1", f"{fmt(added)} ms", f"<= {limit} ms", verdict(added <= limit))
        )
    pm, bare = get(key, "sse_c64"), get("bare", "sse_c64")
    if pm and bare:
        ratio = pm.rps / bare.rps if bare.rps else float("nan")
        checks.append((f"Pacemaker{on} / bare proxy streams/s, SSE c=64", fmt(ratio), "(info)", ""))
    limit = TARGET_CHECKS["cpu_per_event_vs_bare"]
    bare = get("bare", "sse_long_c64")
    for scenario, route in (("sse_long_c64", "chat"), ("tasks_sse_c64", "tasks")):
        pm = get(key, scenario)
        ratios = paired_ratios(results, (key, scenario), ("bare", "sse_long_c64"))
        if pm and bare and ratios:
            ratio = statistics.median(ratios)
            spread = f" (rounds: {' / '.join(fmt(x) for x in ratios)})" if len(ratios) > 1 else ""
            checks.append(
                (
                    f"server CPU per relayed event, {route} SSE c=64, {tokens} tokens: Pacemaker{on}"
                    f" / bare proxy's chat SSE, median of the rounds' ratios{spread}; median rows"
                    f" {fmt(pm.server_cpu_us_per_event, 1)} / {fmt(bare.server_cpu_us_per_event, 1)} us",
                    fmt(ratio),
                    f"<= {limit}x",
                    verdict(ratio <= limit),
                )
            )
    pm, bare = get(key, "sse_c64"), get("bare", "sse_c64")
    if pm and bare:
        ratio = pm.server_cpu_us_per_event / bare.server_cpu_us_per_event
        checks.append(
            (f"server CPU per relayed event, chat SSE c=64, 12 tokens: Pacemaker{on} / bare", fmt(ratio), "(info)", "")
        )
    for scenario in ("json_c1", "json_c64", "sse_c64"):
        pm, bare = get(key, scenario), get("bare", scenario)
        if pm and bare:
            added = pm.server_cpu_ms_per_request - bare.server_cpu_ms_per_request
            label = f"server CPU Pacemaker{on} adds per request, {pm.scenario.label}"
            checks.append((label, f"{fmt(added, 3)} ms", "(info)", ""))
    return checks


def pacemaker_key(backend: str) -> str:
    return "pacemaker" if backend == "embedded" else f"pacemaker_{backend.replace('-', '_')}"


def problems(results: Sequence[Result], args: argparse.Namespace) -> list[str]:
    """What makes the figures meaningless: a row missing, a request failed, a figure that could not be computed."""
    found = [p for r in results for p in r.problems(f"round {r.round_no}, {r.scenario.label}, {r.target.label}")]
    seen = {(r.round_no, r.scenario.key, r.target.key) for r in results}
    for round_no, scenario, target in itertools.product(range(1, args.rounds + 1), args.scenarios, target_keys(args)):
        if (SCENARIOS[scenario].route == "chat" or target.startswith(("pacemaker", "compare_"))) and (
            round_no,
            scenario,
            target,
        ) not in seen:
            found.append(f"round {round_no}, {SCENARIOS[scenario].label}, {target}: no figures")
    return found


def target_keys(args: argparse.Namespace) -> list[str]:
    keys = [t for t in args.targets if t != "pacemaker"]
    if "pacemaker" in args.targets:
        keys += [f"compare_{label}" for label, _ in args.compare]
        keys += [pacemaker_key(b) for b in args.backends]
    return keys


# ---------------------------------------------------------------------------------------------
# Main

DEFAULT_TOKENS = 100
SCENARIOS: dict[str, Scenario] = {}


def scenarios(tokens: int) -> dict[str, Scenario]:
    return {
        "json_c1": Scenario("json_c1", "JSON c=1", 1, stream=False),
        "json_c64": Scenario("json_c64", "JSON c=64", 64, stream=False),
        "sse_c64": Scenario("sse_c64", "SSE c=64", 64, stream=True),
        "sse_long_c64": Scenario("sse_long_c64", f"SSE c=64, {tokens} tokens", 64, stream=True, tokens=tokens),
        "tasks_sse_c64": Scenario(
            "tasks_sse_c64", f"tasks SSE c=64, {tokens} tokens", 64, stream=True, tokens=tokens, route="tasks"
        ),
    }


SCENARIOS.update(scenarios(DEFAULT_TOKENS))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="repeat every row; the median round by req/s is shown (default 3)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--targets", default="upstream,bare,pacemaker", help="comma-separated subset")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="Pacemaker's backends, comma-separated: embedded (SQLite, limits in process) and/or postgres-redis"
        " (PostgreSQL audit and task records, limits in Redis); default both",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help=f"tokens per answer in the long SSE rows, chat and tasks (default {DEFAULT_TOKENS})",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also measure Pacemaker (embedded, or --compare-backend's) from another checkout's code, e.g. a"
        " `git worktree` of an earlier commit, in the same rounds (repeatable): before/after figures from one run",
    )
    parser.add_argument(
        "--compare-backend",
        choices=list(BACKENDS),
        default="embedded",
        help="the backend of the --compare checkouts (default embedded; each gets a database and Redis of its own)",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then record Pacemaker with py-spy for SECONDS under load (default: off)",
    )
    parser.add_argument(
        "--profile-scenario", default="json_c64", choices=list(SCENARIOS), help="the load while profiling"
    )
    parser.add_argument("--profile-backend", default="embedded", choices=list(BACKENDS), help="the Pacemaker profiled")
    parser.add_argument("--profile-out", type=Path, help="where to keep py-spy's raw stacks (default: a temp file)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    backends_given = any(a == "--backends" or a.startswith("--backends=") for a in (argv or sys.argv[1:]))
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin = 0.5, 0.2, 1, True
    if not (
        0.5 <= args.seconds <= 600
        and 0 <= args.warmup <= 60
        and 0 <= args.profile <= 120
        and 1 <= args.rounds <= 20
        and 1 <= args.tokens <= 10_000
    ):
        parser.error(
            "--seconds must be in [0.5, 600], --warmup in [0, 60], --profile in [0, 120], --rounds in [1, 20],"
            " --tokens in [1, 10000]"
        )
    SCENARIOS.clear()
    SCENARIOS.update(scenarios(args.tokens))
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    args.backends = [b for b in args.backends.split(",") if b]
    if args.smoke and not backends_given and "postgres-redis" in args.backends and not postgres_and_redis_available():
        log("no PostgreSQL on 127.0.0.1:5432 or no redis-server: smoke on the embedded backend only")
        args.backends.remove("postgres-redis")
    unknown = (
        [s for s in args.scenarios if s not in SCENARIOS]
        + [t for t in args.targets if t not in ("upstream", "bare", "pacemaker")]
        + [b for b in args.backends if b not in BACKENDS]
    )
    if not args.backends:
        parser.error("--backends names no backend")
    args.compare = [tuple(c.split("=", 1)) for c in args.compare]
    if any(len(c) != 2 or not (Path(c[1]) / "app").is_dir() for c in args.compare):
        parser.error("--compare takes LABEL=DIR, DIR a checkout (with app/)")
    if unknown:
        parser.error(f"unknown scenario or target: {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-"))
    children: list[Child] = []
    results: list[Result] = []
    failures: list[str] = []
    databases = Databases()
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            bare = start_bare_proxy(workdir, fake.port, children)
            targets = {
                "upstream": Target("upstream", "upstream (direct)", f"http://{HOST}:{fake.port}", {}, fake),
                "bare": Target("bare", "bare proxy", f"http://{HOST}:{bare.port}", {}, bare),
            }

            def pacemaker_on(backend: str, key: str, label: str, code: Path = ROOT) -> Target:
                pacemaker, api_key = start_pacemaker_on(
                    backend, databases, workdir, fake.port, children, name=key, code=code
                )
                headers = {"Authorization": f"Bearer {api_key}"}
                return Target(key, label, f"http://{HOST}:{pacemaker.port}", headers, pacemaker, backend)

            for backend in args.backends:
                key = pacemaker_key(backend)
                label = f"Pacemaker ({BACKENDS[backend]})" if BACKENDS[backend] else "Pacemaker"
                targets[key] = pacemaker_on(backend, key, label)
            for label, directory in args.compare:
                key, on = f"compare_{label}", BACKENDS[args.compare_backend]
                targets[key] = pacemaker_on(
                    args.compare_backend, key, f"Pacemaker ({label}{', ' + on if on else ''})", Path(directory)
                )
            for target in targets.values():
                for scenario in SCENARIOS.values():
                    if scenario.runs_on(target):
                        runner.run(probe(target, scenario))

            for round_no in range(1, args.rounds + 1):
                for scenario_key in args.scenarios:
                    scenario = SCENARIOS[scenario_key]
                    for target_key in target_keys(args):
                        target = targets[target_key]
                        if not scenario.runs_on(target):
                            continue
                        if pinning:
                            pin_under_test(target.server, children)
                        log(f"round {round_no}/{args.rounds}  {scenario.label:10} {target.label:18} ...")
                        result = runner.run(run_load(target, scenario, args.warmup, args.seconds, children))
                        result.round_no = round_no
                        results.append(result)
                        log(
                            f"{'':20} {result.rps:,.0f} req/s, p50 {result.percentile(50):.2f} ms,"
                            f" p99 {result.percentile(99):.2f} ms, {result.server_cpu_ms_per_request:.3f} CPU ms/req"
                            + (f", {result.server_cpu_us_per_event:.1f} CPU us/event" if scenario.stream else "")
                        )
                        for error, count in result.errors.most_common(3):
                            log(f"{'':20} {count} x {error}")

            failures += problems(results, args)
            print(render(results, args, pinning))
            if args.json:
                args.json.write_text(json.dumps([_as_dict(r) for r in results], indent=2) + "\n")

            if args.profile > 0:
                target = targets[pacemaker_key(args.profile_backend)]
                if pinning:
                    pin_under_test(target.server, children)
                out = args.profile_out or workdir / "pacemaker.pyspy.txt"
                scenario = SCENARIOS[args.profile_scenario]
                log(f"profiling Pacemaker for {args.profile:g} s under {scenario.label} load -> {out}")

                def load(duration: int) -> None:  # from before py-spy attaches until after it stops
                    runner.run(run_load(target, scenario, 1.0, duration + 1.5, children))

                pyspy.record(target.server.popen.pid, args.profile, out, load, pinning)
                print(f"#### Where {target.label}'s CPU goes ({scenario.label}, py-spy {args.profile:g} s)\n")
                print(pyspy.summarise(out))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
        databases.drop_all()
    return exit_status(failures)


def _as_dict(r: Result) -> dict[str, Any]:
    return {
        "round": r.round_no,
        "target": r.target.key,
        "scenario": r.scenario.key,
        "requests": r.requests,
        "window_s": r.window_s,
        "rps": r.rps,
        "p50_ms": r.percentile(50),
        "p99_ms": r.percentile(99),
        "server_cpu_ms_per_request": r.server_cpu_ms_per_request,
        "events_per_stream": r.scenario.events_per_stream,
        "server_cpu_us_per_event": r.server_cpu_us_per_event if r.scenario.stream else None,
        "server_cpu_s": r.server_cpu_s,
        "loadgen_cpu_s": r.loadgen_cpu_s,
        "other_cpu_s": r.other_cpu_s,
        "errors": dict(r.errors),
    }


if __name__ == "__main__":
    sys.exit(main())
