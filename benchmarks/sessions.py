"""Benchmark what a 20-turn session adds to a task, in process and on Redis, and the memory a stored turn takes.

Usage (--help for every option):

    .venv/bin/python -m benchmarks.sessions [--tasks 20000] [--rounds 3] [--seconds 5] [--no-pin] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from app.agent.runner import initial_messages
from app.agent.schemas import TaskCreate
from app.auth.principal import Principal
from app.config import Settings, load_settings
from app.enforcement.redis_limiter import build_redis
from app.providers.base import Message
from app.providers.registry import ProviderRegistry
from app.sessions.base import SessionStore, encode_turn
from app.sessions.conversation import Conversations
from app.sessions.memory import MemorySessionStore
from app.sessions.metrics import SessionMetrics
from app.sessions.redis_store import RedisSessionStore
from app.tasks.spec import build_task_spec
from app.tools.registry import ToolRegistry, builtin_tools
from benchmarks.harness import (
    HOST,
    LOAD_CPU,
    SERVER_CPU,
    Child,
    can_pin,
    clean_up,
    exit_status,
    fmt,
    log,
    new_loop,
    pacemaker_cli,
    percentile,
    pin,
    pin_under_test,
    serve_pacemaker,
    start_fake_upstream,
    start_redis,
    terminate_on_sigterm,
    verdict,
    wait_for_quiet_machine,
    write_config,
)
from benchmarks.loadgen import REQUEST_TIMEOUT_S

TURNS = 20
SESSIONS = 50  # part A: the sessions the tasks take in turn
TARGETS_MS = {"memory": 0.5, "redis": 1.5}
BACKENDS = {"memory": "in process", "redis": "Redis"}
MODEL = "fake-model"
# A chat turn of ordinary size: a question and an answer of about 60 words (no tool call).
ANSWER = " ".join(["The", "weather", "there", "was", "mild", "and", "dry", "with", "a", "light", "breeze"] * 6) + "."
QUERY = "Question {n:06d}: what did we say about the weather in that city last week?"
E2E_QUERY = "What did we say about the weather in that city last week? #tokens=60"


def turn_of(query: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def session_bound(turn_bytes: int) -> int:
    """max_session_bytes holding exactly TURNS such turns: every append then drops the oldest one."""
    return TURNS * turn_bytes + turn_bytes // 2


# ---------------------------------------------------------------------------------------------
# A. In process: the session steps of one task, with the production objects


@dataclass
class Steps:
    label: str
    latencies_us: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies_us), q) / 1000


async def part_a(settings: Settings, store: SessionStore | None, tasks: int, label: str) -> Steps:
    """Per task: build the spec, (open the session), the initial messages and their wire JSON, (append the turn).

    Without a store the same loop runs without the session's two steps: the difference is what a
    session adds. The sessions were filled with TURNS turns beforehand, and stay at TURNS.
    """
    steps = Steps(label)
    conversations = Conversations(store, settings) if store is not None else None
    providers = ProviderRegistry(settings)
    tools = ToolRegistry(builtin_tools())
    principal = Principal(key_id=1, name="bench", prefix="pk_bench")
    for n in range(tasks):
        session = f"s{n % SESSIONS}"
        body = TaskCreate(query=QUERY.format(n=n), model="sim-small", session_id=session)
        started = time.perf_counter_ns()
        spec = build_task_spec(
            body, settings=settings, providers=providers, tools=tools, stream=False, principal=principal
        )
        turn = await conversations.open(1, session, spec) if conversations is not None else None
        messages = initial_messages(spec)
        wire = orjson.dumps(messages)  # what the provider sends: a longer body with history
        spec.turn = [messages[-1], {"role": "assistant", "content": ANSWER}]  # what the runner builds
        outcome = await turn.complete() if turn is not None else None
        steps.latencies_us.append((time.perf_counter_ns() - started) / 1000)
        if outcome is not None and (outcome.history_turns != TURNS or not outcome.stored):
            steps.problems.append(
                f"{label}: task {n}: {outcome.history_turns} turns sent, stored {outcome.stored} ({outcome.reason})"
            )
        if not wire:
            steps.problems.append(f"{label}: no request body")
    await providers.aclose()
    return steps


async def fill(store: SessionStore, key_id: int, sessions: int, turns: int) -> None:
    """`sessions` sessions of `turns` turns each, appended as tasks append them."""
    for s in range(sessions):
        for n in range(turns):
            data = encode_turn(turn_of(QUERY.format(n=n), ANSWER))
            await store.begin((key_id, f"s{s}"), f"fill-{s}-{n}", 60)
            appended = await store.finish((key_id, f"s{s}"), f"fill-{s}-{n}", data)
            if not appended.stored:
                raise RuntimeError(f"fill: a turn was not stored ({appended.reason})")


async def memory_per_turn(settings: Settings, redis_url: str, sessions: int) -> dict[str, float]:
    """Bytes per stored turn: the turn itself, and what holding it costs in process (tracemalloc) and in Redis."""
    figures: dict[str, float] = {"stored": float(len(encode_turn(turn_of(QUERY.format(n=0), ANSWER))))}
    turns = sessions * TURNS
    pool = MemorySessionStore(settings.sessions, SessionMetrics.register(CollectorRegistry()))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await fill(pool, 1, sessions, TURNS)
    gc.collect()
    figures["memory"] = (tracemalloc.get_traced_memory()[0] - before) / turns
    tracemalloc.stop()
    redis = build_redis(redis_url)
    prefixed = settings.sessions.model_copy(update={"redis_prefix": f"bench-memory:{uuid.uuid4().hex[:8]}"})
    store = RedisSessionStore(redis, prefixed, SessionMetrics.register(CollectorRegistry()))
    try:
        used = int((await redis.info("memory"))["used_memory"])
        await fill(store, 2, sessions, TURNS)
        figures["redis"] = (int((await redis.info("memory"))["used_memory"]) - used) / turns
    finally:
        await store.aclose()
    return figures


# ---------------------------------------------------------------------------------------------
# B. End to end: JSON tasks at concurrency 1 against a server, with and without a 20-turn session


@dataclass
class Paired:
    """Requests with and without the session one after the other for the whole run, so that both see
    the same machine: their latencies, and what went wrong."""

    label: str
    latencies_ms: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    errors: list[str] = field(default_factory=list)

    def p(self, with_session: bool, q: float) -> float:
        return percentile(sorted(self.latencies_ms[with_session]), q)

    @property
    def added(self) -> float:
        return self.p(True, 50) - self.p(False, 50)


async def paired(
    label: str, url: str, headers: dict[str, str], bodies: dict[bool, bytes], warmup: float, seconds: float
) -> Paired:
    """Alternate the two bodies at concurrency 1 for warmup + seconds; the requests after the warm-up count."""
    run = Paired(label)
    begin = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        n = 0
        while (started := time.perf_counter()) < begin + warmup + seconds:
            flag = bool(n % 2)
            n += 1
            async with http.post(url, data=bodies[flag]) as response:
                content = await response.read()
            if response.status != 200:
                run.errors.append(f"{label}: HTTP {response.status} {content[:200]!r}")
            elif started >= begin + warmup:
                run.latencies_ms[flag].append((time.perf_counter() - started) * 1000)
    for flag, latencies in run.latencies_ms.items():
        if not latencies:
            run.errors.append(f"{label}: no request {'with' if flag else 'without'} the session completed")
    return run


async def probe_answer(upstream: Child) -> str:
    """The fake upstream's answer to E2E_QUERY (it depends only on #tokens): to size the sessions."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": E2E_QUERY}]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://{HOST}:{upstream.port}/v1/chat/completions", json=body) as response,
    ):
        answer: str = (await response.json())["choices"][0]["message"]["content"]
        return answer


def e2e_bodies(name: str, answer: str) -> dict[bool, bytes]:
    """What is sent with and without the session: a task to Pacemaker, or the model call it makes to the upstream."""
    if name in BACKENDS:
        task = {"query": E2E_QUERY, "model": MODEL}
        return {False: orjson.dumps(task), True: orjson.dumps({**task, "session_id": f"bench-{name}"})}
    system: Message = {"role": "system", "content": Settings().agent.system_prompt}
    history = [message for _ in range(TURNS) for message in turn_of(E2E_QUERY, answer)]
    query: Message = {"role": "user", "content": E2E_QUERY}
    return {
        flag: orjson.dumps({"model": MODEL, "messages": [system, *(history if flag else []), query]})
        for flag in (False, True)
    }


def start_servers(workdir: Path, children: list[Child], redis: Child, bound: int) -> tuple[dict[str, Child], str]:
    fake = children[0]
    database = f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"
    servers: dict[str, Child] = {}
    key = ""
    for name in BACKENDS:
        own = workdir / name
        own.mkdir()
        config: dict[str, Any] = {
            "database": {"url": database},
            "auth": {"dev_key_file": str(own / "dev-key")},
            "audit": {"spool_dir": str(own / "audit-spool")},
            "tasks": {"spool_dir": str(own / "task-spool")},
            "limits": {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 4096},
            "sessions": {"max_session_bytes": bound},
            "providers": {
                "simulated": {"kind": "simulated", "tokens_per_second": 0},
                "fake": {"kind": "openai", "base_url": f"http://{HOST}:{fake.port}/v1", "api_key": "sk-bench"},
            },
            "models": {
                **{sim: {"provider": "simulated"} for sim in ("sim-small", "sim-medium", "sim-large")},
                MODEL: {"provider": "fake"},
            },
        }
        if name == "redis":
            config["sessions"]["redis_url"] = f"redis://{HOST}:{redis.port}/0"
        env = write_config(own / "pacemaker.yaml", config)
        if name == "memory":
            pacemaker_cli(env, "migrate")
            key = json.loads(pacemaker_cli(env, "keys", "create", "--name", "bench", "--json"))["key"]
        servers[name] = serve_pacemaker(f"pacemaker (sessions {BACKENDS[name]})", env, own / "pacemaker.log", children)
    return servers, key


async def prepare_session(server: Child, headers: dict[str, str], session: str) -> str | None:
    """Fill `session` with TURNS turns on `server`; why it could not, or None."""
    url = f"http://{HOST}:{server.port}/v1/tasks"
    body = {"query": E2E_QUERY, "model": MODEL, "session_id": session}
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(TURNS + 2):
            async with http.post(url, json=body) as response:
                if response.status != 200:
                    return f"filling {session}: HTTP {response.status} {(await response.read())[:200]!r}"
        async with http.get(f"http://{HOST}:{server.port}/v1/sessions/{session}") as response:
            turns = (await response.json())["turns"]
    return None if turns == TURNS else f"{session} holds {turns} turns, not {TURNS}: the session bound is off"


# ---------------------------------------------------------------------------------------------


def render(a: dict[str, list[Steps]], b: list[Paired], memory: dict[str, float], args: argparse.Namespace) -> str:
    def median(values: list[float]) -> float:
        return sorted(values)[(len(values) - 1) // 2] if values else math.nan

    lines = [
        f"Sessions benchmark, {platform.python_implementation()} {platform.python_version()},"
        f" {TURNS}-turn history, {args.rounds} round(s)\n",
        "#### A. The session steps of one task, in process (median of rounds; microsecond timer)\n",
        "| variant | p50 ms | p99 ms | added p50 ms | target | verdict |",
        "|---|---:|---:|---:|---|---|",
    ]
    off = median([s.p(50) for s in a["off"]])
    added: dict[str, float] = {}
    for name in ("off", *BACKENDS):
        p50, p99 = median([s.p(50) for s in a[name]]), median([s.p(99) for s in a[name]])
        if name == "off":
            lines.append(f"| no session | {fmt(p50, 3)} | {fmt(p99, 3)} | | | |")
            continue
        added[name] = p50 - off
        target = TARGETS_MS[name]
        lines.append(
            f"| session, {BACKENDS[name]} | {fmt(p50, 3)} | {fmt(p99, 3)} | {fmt(added[name], 3)} |"
            f" < {target} ms | {verdict(added[name] < target)} |"
        )
    lines += [
        "",
        "#### B. End to end: JSON tasks at concurrency 1, with and without the session in turn (median of rounds)\n",
    ]
    lines += ["| server | p50 ms, no session | p50 ms, 20 turns | p99 ms, 20 turns | added p50 ms |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for name in (*BACKENDS, "upstream"):
        runs = [r for r in b if r.label == name]
        title = (
            f"Pacemaker, sessions {BACKENDS[name]}"
            if name in BACKENDS
            else "the fake upstream alone (2 vs 42 messages)"
        )
        without, with_session = median([r.p(False, 50) for r in runs]), median([r.p(True, 50) for r in runs])
        lines.append(
            f"| {title} | {fmt(without, 3)} | {fmt(with_session, 3)} |"
            f" {fmt(median([r.p(True, 99) for r in runs]), 3)} | {fmt(median([r.added for r in runs]), 3)} |"
        )
    lines += ["", "#### Memory per stored turn\n", "| what | bytes per turn |", "|---|---:|"]
    lines.append(f"| the stored turn (a 2-message turn of {TURNS} like it per session) | {fmt(memory['stored'], 0)} |")
    lines.append(f"| in process, with the pool's overhead (tracemalloc) | {fmt(memory['memory'], 0)} |")
    lines.append(f"| Redis (used_memory), with the hash and index overhead | {fmt(memory['redis'], 0)} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000, help="part A: tasks per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the variants take turns in each")
    parser.add_argument("--seconds", type=float, default=5.0, help="part B: measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="part B: seconds before each row is measured")
    parser.add_argument("--memory-sessions", type=int, default=500, help=f"sessions of {TURNS} turns for memory")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--smoke", action="store_true", help="seconds: every part once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.rounds, args.seconds, args.warmup, args.memory_sessions, args.no_pin = (
            300,
            1,
            0.5,
            0.2,
            20,
            True,
        )
    if not (args.tasks >= 100 and 1 <= args.rounds <= 20 and 0.5 <= args.seconds <= 600 and args.memory_sessions >= 1):
        parser.error("--tasks >= 100, --rounds in [1, 20], --seconds in [0.5, 600], --memory-sessions >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-sessions-"))
    children: list[Child] = []
    failures: list[str] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            if not args.smoke:
                wait_for_quiet_machine()
            upstream = start_fake_upstream(workdir, children)
            redis = start_redis(workdir, children)
            redis_url = f"redis://{HOST}:{redis.port}/0"
            bound = session_bound(len(encode_turn(turn_of(QUERY.format(n=0), ANSWER))))
            settings = load_settings(sessions={"max_session_bytes": bound, "redis_url": redis_url})
            if pinning:  # part A: this process alone on its CPU, Redis and the rest on the other
                for child in children:
                    pin(child.popen.pid, {LOAD_CPU})
                pin(os.getpid(), {SERVER_CPU})

            a: dict[str, list[Steps]] = {"off": [], "memory": [], "redis": []}
            stores: dict[str, SessionStore] = {
                "memory": MemorySessionStore(settings.sessions, SessionMetrics.register(CollectorRegistry())),
                "redis": RedisSessionStore(
                    build_redis(redis_url), settings.sessions, SessionMetrics.register(CollectorRegistry())
                ),
            }
            for store in stores.values():
                runner.run(fill(store, 1, SESSIONS, TURNS))
            for round_no in range(1, args.rounds + 1):
                for name in a:
                    log(f"A round {round_no}/{args.rounds}: {name} ...")
                    steps = runner.run(part_a(settings, stores.get(name), args.tasks, name))
                    a[name].append(steps)
                    failures += steps.problems[:5]
                    log(f"{'':10} p50 {steps.p(50):.3f} ms, p99 {steps.p(99):.3f} ms")
            for store in stores.values():
                runner.run(store.aclose())
            memory = runner.run(memory_per_turn(settings, redis_url, args.memory_sessions))

            answer = runner.run(probe_answer(upstream))
            servers, key = start_servers(
                workdir, children, redis, session_bound(len(encode_turn(turn_of(E2E_QUERY, answer))))
            )
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            b: list[Paired] = []
            for name, server in servers.items():
                problem = runner.run(prepare_session(server, headers, f"bench-{name}"))
                failures += [problem] if problem else []
            targets = {name: (f"http://{HOST}:{server.port}/v1/tasks", server) for name, server in servers.items()}
            targets["upstream"] = (f"http://{HOST}:{upstream.port}/v1/chat/completions", upstream)
            for round_no in range(1, args.rounds + 1):
                for name, (url, server) in targets.items():
                    if pinning:
                        pin_under_test(server, children)
                    log(f"B round {round_no}/{args.rounds}: {name} ...")
                    run = runner.run(paired(name, url, headers, e2e_bodies(name, answer), args.warmup, args.seconds))
                    b.append(run)
                    failures += run.errors[:5]
                    log(f"{'':10} p50 {run.p(False, 50):.3f} ms without, {run.p(True, 50):.3f} ms with the session")
            print(render(a, b, memory, args))
            if not all(math.isfinite(v) for v in memory.values()):
                failures.append("memory per turn could not be computed")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
