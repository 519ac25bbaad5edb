"""Benchmark background tasks: server CPU per streamed task against plain SSE, and replay and resume of their logs.

Usage (--help for every option):

    .venv/bin/python -m benchmarks.tasks [--rounds 3] [--database-url URL] [--profile 10] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from benchmarks import pyspy
from benchmarks.harness import (
    HOST,
    Child,
    can_pin,
    clean_up,
    exit_status,
    fmt,
    log,
    new_loop,
    pacemaker_cli,
    percentile,
    pin_under_test,
    serve_pacemaker,
    start_fake_upstream,
    start_redis,
    terminate_on_sigterm,
    verdict,
    wait_for_quiet_machine,
    write_config,
)
from benchmarks.loadgen import REQUEST_TIMEOUT_S, Window, closed_loop, first_request

MODEL = "fake-model"
TOKENS = 20
EVENTS = TOKENS + 2  # task.started, one token.delta per token, task.completed
LONG_EVENTS = 10_000
TARGET_RATIO = 1.3
LOGS = {"memory": "in-process log", "redis": "Redis log"}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    server: str  # the Pacemaker whose event log is LOGS[server]
    background: bool

    def body(self) -> bytes:
        query = f"Name the Greek letters, please. #tokens={TOKENS}"
        return orjson.dumps({"query": query, "model": MODEL, "stream": True, "background": self.background})


ROWS = {
    "plain": Row("plain", "plain SSE", "memory", background=False),
    "bg_memory": Row("bg_memory", "background + stream, in-process log", "memory", background=True),
    "bg_redis": Row("bg_redis", "background + stream, Redis log", "redis", background=True),
}


def stream_problem(body: bytes, last: int, first: int = 1) -> str | None:
    """Why an SSE body is not exactly events first..last, ending with task.completed; None if it is."""
    seqs = [int(line[4:]) for line in body.split(b"\n") if line.startswith(b"id: ")]
    if seqs != list(range(first, last + 1)):
        return f"{len(seqs)} events ({len(seqs) - len(set(seqs))} duplicate seqs), expected seqs {first}..{last}"
    if not body[body.rfind(b"\nevent: ") :].startswith(b"\nevent: task.completed\n"):  # JSON has no raw newline
        return "the last event is not task.completed"
    return None


def valid_stream(status: int, body: bytes) -> bool:
    return status == 200 and stream_problem(body, EVENTS) is None


@dataclass(kw_only=True)
class Result(Window):
    row: Row
    round_no: int = 1
    stream_problems: Counter[str] = field(default_factory=Counter)  # why the invalid streams were

    @property
    def events_per_s(self) -> float:
        return self.rps * EVENTS


@dataclass
class Servers:
    children: list[Child] = field(default_factory=list)
    pacemaker: dict[str, Child] = field(default_factory=dict)
    key: str = ""

    def url(self, server: str, path: str) -> str:
        return f"http://{HOST}:{self.pacemaker[server].port}{path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}


def start_servers(workdir: Path, servers: Servers, database_url: str | None) -> None:
    fake = start_fake_upstream(workdir, servers.children)
    redis = start_redis(workdir, servers.children)
    database = database_url or f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"  # both servers: one key
    for name in LOGS:
        own = workdir / name
        own.mkdir()
        config: dict[str, Any] = {
            "database": {"url": database},
            "auth": {"dev_key_file": str(own / "dev-key")},
            "server": {"access_log": False},
            "audit": {"spool_dir": str(own / "audit-spool")},  # each server its own journals
            "tasks": {"spool_dir": str(own / "task-spool")},
            # Enforcement stays on (its cost is part of what is measured) with limits the load never reaches.
            "limits": {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 4096, "max_background_tasks": 4096},
            "providers": {
                "simulated": {"kind": "simulated", "tokens_per_second": 0},  # the tiers' models, unused
                "fake": {"kind": "openai", "base_url": f"http://{HOST}:{fake.port}/v1", "api_key": "sk-bench"},
            },
            "models": {
                **{sim: {"provider": "simulated"} for sim in ("sim-small", "sim-medium", "sim-large")},
                MODEL: {"provider": "fake", "input_usd_per_mtok": "1.0", "output_usd_per_mtok": "2.0"},
            },
        }
        if name == "redis":
            config["events"] = {"redis_url": f"redis://{HOST}:{redis.port}/0"}
        env = write_config(own / "pacemaker.yaml", config)
        if name == "memory":
            pacemaker_cli(env, "migrate")
            servers.key = json.loads(pacemaker_cli(env, "keys", "create", "--name", "bench", "--json"))["key"]
        log_path = own / "pacemaker.log"
        servers.pacemaker[name] = serve_pacemaker(f"pacemaker ({name} log)", env, log_path, servers.children)


# ---------------------------------------------------------------------------------------------
# 1. CPU per task


async def run_row(row: Row, servers: Servers, concurrency: int, warmup: float, seconds: float) -> Result:
    result = Result(row=row)

    def valid(status: int, body: bytes) -> bool:
        problem = stream_problem(body, EVENTS) if status == 200 else f"HTTP {status}"
        if problem is not None:
            result.stream_problems[problem] += 1  # closed_loop counts it in errors, by status and body
        return problem is None

    server, url = servers.pacemaker[row.server], servers.url(row.server, "/v1/tasks")
    body, headers, children = row.body(), servers.headers, servers.children
    return await closed_loop(result, url, body, headers, valid, concurrency, warmup, seconds, server, children)


def medians(results: Sequence[Result]) -> dict[str, tuple[Result, list[Result]]]:
    """Per row: the round with the median server CPU per task, and every round."""
    by_row: dict[str, list[Result]] = {}
    for r in results:
        by_row.setdefault(r.row.key, []).append(r)
    return {
        key: (sorted(runs, key=lambda r: r.server_cpu_ms_per_request)[(len(runs) - 1) // 2], runs)
        for key, runs in by_row.items()
    }


def ratio(results: Sequence[Result], key: str, round_no: int | None = None) -> float:
    """Server CPU per task of row `key` / plain SSE's: of the median rounds, or of one round."""
    if round_no is None:
        rows = medians(results)
        chosen = {k: rows[k][0] for k in (key, "plain") if k in rows}
    else:
        chosen = {r.row.key: r for r in results if r.round_no == round_no}
    if key not in chosen or "plain" not in chosen:
        return math.nan
    return chosen[key].server_cpu_ms_per_request / chosen["plain"].server_cpu_ms_per_request


# ---------------------------------------------------------------------------------------------
# 2. and 3. A finished 10,000-event task: replay and resume


async def long_task(http: aiohttp.ClientSession, servers: Servers, server: str) -> str:
    """A finished background task of LONG_EVENTS events on `server`; its id."""
    # max_tokens: the runner ends a call at its estimate of max_tokens (1,024 by default).
    body = {"query": f"Go on. #tokens={LONG_EVENTS - 2}", "model": MODEL, "background": True, "max_tokens": 32_768}
    async with http.post(servers.url(server, "/v1/tasks"), json=body, headers=servers.headers) as response:
        if response.status != 202:
            raise RuntimeError(f"long task on {server}: HTTP {response.status} {(await response.read())[:300]!r}")
        task_id: str = (await response.json())["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        async with http.get(servers.url(server, f"/v1/tasks/{task_id}"), headers=servers.headers) as response:
            status = (await response.json())["status"]
        if status not in ("queued", "running"):
            if status != "completed":
                raise RuntimeError(f"long task on {server} ended {status}")
            # The run closes its log writer after the final record: time to flush (Redis), so that
            # replays read the log, not the running task's events in memory.
            await asyncio.sleep(1.0)
            return task_id
        await asyncio.sleep(0.2)
    raise RuntimeError(f"long task on {server} did not end within 120 s")


@dataclass
class Timed:
    """Latencies of one kind of request on one log, the server's CPU over them, and what went wrong."""

    kind: str  # replay or resume
    server: str
    latencies_ms: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def label(self) -> str:
        return f"{self.kind}, {LOGS[self.server]}"

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    @property
    def cpu_ms(self) -> float:
        return self.server_cpu_s * 1000 / len(self.latencies_ms) if self.latencies_ms else math.nan


async def replay_and_resume(
    http: aiohttp.ClientSession, servers: Servers, server: str, replays: int, resumes: int
) -> list[Timed]:
    task_id = await long_task(http, servers, server)
    url, child = servers.url(server, f"/v1/tasks/{task_id}/events"), servers.pacemaker[server]
    replay, resume = Timed("replay", server), Timed("resume", server)
    cpu = child.cpu_seconds()
    for _ in range(replays):
        started = time.perf_counter()
        async with http.get(url, headers=servers.headers) as response:
            body = await response.read()
        elapsed = (time.perf_counter() - started) * 1000
        problem = stream_problem(body, LONG_EVENTS) if response.status == 200 else f"HTTP {response.status}"
        if problem is None:
            replay.latencies_ms.append(elapsed)
        else:
            replay.errors[problem] += 1
    replay.server_cpu_s, cpu = child.cpu_seconds() - cpu, child.cpu_seconds()
    for i in range(resumes):
        after = random.randrange(LONG_EVENTS)  # 0 .. the seq before the last
        started = time.perf_counter()
        async with http.get(url, headers={**servers.headers, "Last-Event-ID": str(after)}) as response:
            frame = await response.content.readuntil(b"\n\n") if response.status == 200 else b""
            elapsed = (time.perf_counter() - started) * 1000
            if i == 0:  # once per log, the rest too: exactly after + 1 .. the end
                problem = stream_problem(frame + await response.read(), LONG_EVENTS, after + 1)
                resume.errors.update([f"after {after}: {problem}"] if problem else [])
            response.close()  # a client that got what it waited for and leaves: the connection goes too
        if frame.startswith(b"id: %d\n" % (after + 1)):
            resume.latencies_ms.append(elapsed)
        else:
            resume.errors[f"HTTP {response.status}, after {after}: {frame[:80]!r}"] += 1
    resume.server_cpu_s = child.cpu_seconds() - cpu
    return [replay, resume]


# ---------------------------------------------------------------------------------------------
# Report


def render(results: Sequence[Result], timings: Sequence[Timed], args: argparse.Namespace, pinning: bool) -> str:
    rows = medians(results)
    rounds = f"median of {args.rounds} rounds by server CPU per task" if args.rounds > 1 else "one round"
    database = "PostgreSQL" if args.database_url and "postgres" in args.database_url else "SQLite"
    lines = [
        "### Background tasks: CPU per streamed task, replay and resume",
        "",
        f"{platform.python_implementation()} {platform.python_version()}, {psutil.cpu_count()} CPUs"
        f" ({'server under test pinned to CPU 0, the rest to CPU 1' if pinning else 'not pinned'}), one worker,"
        f" {database}; {TOKENS}-token answers ({EVENTS} events) from the fake upstream; closed loop at"
        f" concurrency {args.concurrency}, {args.warmup:g} s warm-up + {args.seconds:g} s measured per row, {rounds}.",
        "",
        "| POST /v1/tasks, stream | tasks/s | events/s | server CPU ms/task | ms/task, all rounds | p50 ms | p99 ms"
        " | server CPU % | other CPU % | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, runs in rows.values():
        lines.append(
            f"| {r.row.label} | {fmt(r.rps, 0)} | {fmt(r.events_per_s, 0)} | {fmt(r.server_cpu_ms_per_request, 3)}"
            f" | {' / '.join(fmt(x.server_cpu_ms_per_request, 3) for x in runs)} | {fmt(r.percentile(50))}"
            f" | {fmt(r.percentile(99))} | {fmt(100 * r.server_cpu_s / r.window_s, 0)}"
            f" | {fmt(100 * r.other_cpu_s / r.window_s, 0)} | {sum(sum(x.errors.values()) for x in runs)} |"
        )
    lines += ["", "| check: server CPU per task, background / plain SSE | measured | all rounds | target | verdict |"]
    lines += ["|---|---:|---:|---|---|"]
    for key in ("bg_memory", "bg_redis"):
        if key in rows:
            measured, outcome = ratio(results, key), verdict(ratio(results, key) <= TARGET_RATIO)
            spread = " / ".join(fmt(ratio(results, key, n)) for n in range(1, args.rounds + 1))
            lines.append(f"| {ROWS[key].label} | {fmt(measured)}x | {spread} | <= {TARGET_RATIO}x | {outcome} |")
    lines += [
        "",
        f"| finished task of {LONG_EVENTS:,} events | p50 ms | p99 ms | events/s at p50 | server CPU ms each | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in timings:
        rate = fmt(LONG_EVENTS / t.p(50) * 1000, 0) if t.kind == "replay" else ""
        lines.append(
            f"| {t.label} | {fmt(t.p(50))} | {fmt(t.p(99))} | {rate} | {fmt(t.cpu_ms)} | {len(t.latencies_ms)} |"
        )
    lines += [
        "",
        f"Replay: from the request to the last of the {LONG_EVENTS:,} events of GET /v1/tasks/{{id}}/events. Resume:"
        " from the request with Last-Event-ID: N (N at random) to the first replayed event, a new connection each.",
    ]
    return "\n".join(lines) + "\n"


def problems(results: Sequence[Result], timings: Sequence[Timed], args: argparse.Namespace) -> list[str]:
    found = [p for r in results for p in r.problems(f"round {r.round_no}, {r.row.label}")]
    found += [f"{r.row.label}: {n} x {why}" for r in results for why, n in r.stream_problems.items()]
    seen = {(r.round_no, r.row.key) for r in results}
    found += [f"round {n}, {k}: no figures" for n in range(1, args.rounds + 1) for k in args.rows if (n, k) not in seen]
    found += [f"{ROWS[k].label}: no ratio" for k in args.rows if k != "plain" and not math.isfinite(ratio(results, k))]
    for t in timings:
        found += [f"{t.label}: {count} x {error}" for error, count in t.errors.items()]
        if not (math.isfinite(t.p(50)) and math.isfinite(t.cpu_ms)):
            found.append(f"{t.label}: a figure could not be computed")
    if len(timings) != 2 * len(LOGS):
        found.append("replay or resume: a log has no figures")
    return found


def as_json(results: Sequence[Result], timings: Sequence[Timed]) -> dict[str, Any]:
    load = [
        {"round": r.round_no, "row": r.row.key, "tasks": r.requests, "window_s": r.window_s, "tasks_per_s": r.rps}
        | {"events_per_s": r.events_per_s, "server_cpu_ms_per_task": r.server_cpu_ms_per_request}
        | {"p50_ms": r.percentile(50), "p99_ms": r.percentile(99), "other_cpu_s": r.other_cpu_s, "errors": r.errors}
        for r in results
    ]
    finished = [
        {"what": t.kind, "log": t.server, "p50_ms": t.p(50), "p99_ms": t.p(99), "server_cpu_ms": t.cpu_ms}
        | {"runs": len(t.latencies_ms), "errors": t.errors}
        for t in timings
    ]
    ratios = {k: ratio(results, k) for k in ("bg_memory", "bg_redis")}
    return {"load": load, "ratio_to_plain": ratios, "target_ratio": TARGET_RATIO, "finished_task": finished}


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per row (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every row (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="tasks in flight (default 32)")
    parser.add_argument("--replays", type=int, default=20, help="replays of the finished task per log (default 20)")
    parser.add_argument("--resumes", type=int, default=500, help="resumes of the finished task per log (default 500)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--database-url", help="an empty database of yours instead of SQLite (migrated here)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS", help="then py-spy for SECONDS")
    parser.add_argument("--profile-row", default="bg_memory", choices=list(ROWS), help="the load while profiling")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin, args.replays, args.resumes = 0.5, 0.2, 1, True, 2, 20
    args.rows = [r for r in args.rows.split(",") if r]
    if not set(args.rows) <= set(ROWS) or "plain" not in args.rows:
        parser.error(f"--rows: a subset of {', '.join(ROWS)} with plain in it")
    if not (0.5 <= args.seconds <= 600 and 1 <= args.rounds <= 20 and 1 <= args.concurrency <= 1024):
        parser.error("--seconds must be in [0.5, 600], --rounds in [1, 20], --concurrency in [1, 1024]")
    if args.replays < 1 or args.resumes < 1 or not 0 <= args.profile <= 120:
        parser.error("--replays and --resumes must be at least 1, --profile in [0, 120]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-tasks-"))
    servers = Servers()
    results: list[Result] = []
    timings: list[Timed] = []
    failures: list[str] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            if not args.smoke:
                wait_for_quiet_machine()
            log(f"starting servers in {workdir}")
            start_servers(workdir, servers, args.database_url)
            for row in (ROWS[k] for k in args.rows):  # a broken setup fails here, with the server's log
                url, server = servers.url(row.server, "/v1/tasks"), servers.pacemaker[row.server]
                runner.run(first_request(row.label, url, row.body(), servers.headers, valid_stream, server))

            for round_no in range(1, args.rounds + 1):
                for row in (ROWS[k] for k in args.rows):  # the rows in turn: each ratio compares runs close in time
                    if pinning:
                        pin_under_test(servers.pacemaker[row.server], servers.children)
                    log(f"round {round_no}/{args.rounds}  {row.label:40} ...")
                    result = runner.run(run_row(row, servers, args.concurrency, args.warmup, args.seconds))
                    result.round_no = round_no
                    results.append(result)
                    log(
                        f"{'':20} {result.rps:,.0f} tasks/s, {result.server_cpu_ms_per_request:.3f} CPU ms/task,"
                        f" p50 {result.percentile(50):.2f} ms, {sum(result.errors.values())} errors"
                    )
                    for error, count in (result.errors + result.stream_problems).most_common(4):
                        log(f"{'':20} {count} x {error}")

            async def finished_task() -> None:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http:
                    for server in LOGS:
                        if pinning:
                            pin_under_test(servers.pacemaker[server], servers.children)
                        log(f"finished {LONG_EVENTS:,}-event task, {LOGS[server]}: replays and resumes ...")
                        timings.extend(await replay_and_resume(http, servers, server, args.replays, args.resumes))

            runner.run(finished_task())
            failures += problems(results, timings, args)
            print(render(results, timings, args, pinning))
            if args.json:
                args.json.write_text(json.dumps(as_json(results, timings), indent=2) + "\n")

            if args.profile > 0:
                row, server = ROWS[args.profile_row], servers.pacemaker[ROWS[args.profile_row].server]
                if pinning:
                    pin_under_test(server, servers.children)
                out = workdir / "pacemaker.pyspy.txt"
                log(f"profiling {server.name} for {args.profile:g} s under {row.label} load -> {out}")

                def load(duration: int) -> None:  # from before py-spy attaches until after it stops
                    run = runner.run(run_row(row, servers, args.concurrency, 1.0, duration + 1.5))
                    log(f"{'':20} while profiled: {run.rps:,.0f} tasks/s, {run.server_cpu_ms_per_request:.3f} ms/task")

                pyspy.record(server.popen.pid, args.profile, out, load, pinning)
                print(f"#### Where the CPU goes ({row.label}, py-spy {args.profile:g} s)\n")
                print(pyspy.summarise(out))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(servers.children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
