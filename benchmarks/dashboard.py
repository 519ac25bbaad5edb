"""Benchmark the activity feed's cost: Pacemaker's throughput and CPU with 0, 1 and 20 dashboards connected.

Usage (--help for every option):

    .venv/bin/python -m benchmarks.dashboard [--seconds 5] [--rounds 5] [--dashboards 0,1,20] [--smoke]

Starts the fake upstream and Pacemaker (one uvicorn worker, SQLite, enforcement and audit on, as
the chat benchmark serves it) and drives POST /v1/chat/completions, non-streamed at concurrency 64
(the chat benchmark's JSON c=64 load), while N dashboards are connected: WebSocket clients that
subscribe to the activity topic with an admin key and read every snapshot, as the page does. Rows
alternate between the dashboard counts round after round (the median round by req/s is shown), so
that a slow drift of the machine hits them alike. Server CPU is the Pacemaker process's
user+system time over the measured window. With two or more CPUs the server is pinned to CPU 0 and
everything else to CPU 1 (--no-pin turns it off).

Then the same server with no load and 0, 1 and 20 dashboards (--idle seconds each): its CPU is
the feed's own (a tick a second, the fan-out), without the load's noise, which on a shared 2-core
machine is larger than the 3 % looked for. And in process: Activity.observe() of a chat
completion's audit row (what every request pays, dashboards or not), and one tick's report, merge
and encoding with a full minute of counters behind it (--tick-rps requests a second).

Target: 20 dashboards cost under 3 % of the throughput without any. --smoke runs every row once,
briefly and unpinned (figures mean nothing); either way the exit status is 1 if a request failed, a
dashboard missed its snapshots, a row is missing, or a figure could not be computed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psutil
import websockets

from app.observability.activity import Activity
from app.observability.activity_merge import merge
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
    pin_under_test,
    serve_pacemaker,
    start_fake_upstream,
    terminate_on_sigterm,
    verdict,
    wait_for_quiet_machine,
    write_config,
)
from benchmarks.loadgen import Window, closed_loop, first_request

PATH = "/v1/chat/completions"
MODEL = "fake-model"
CONCURRENCY = 64
BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name twelve Greek letters, please."},
        ],
    }
)
TARGET_LOSS = 0.03  # 20 dashboards may cost at most this share of the throughput
OBSERVE_CALLS = 200_000


def valid(status: int, body: bytes) -> bool:
    return status == 200 and b'"choices"' in body


@dataclass(kw_only=True)
class Row(Window):
    dashboards: int
    round_no: int
    snapshots: list[int] = field(default_factory=list)  # per dashboard, received in the measured window


def start_pacemaker(workdir: Path, upstream_port: int, children: list[Child]) -> tuple[Child, str, str]:
    """Pacemaker as the chat benchmark serves it; it, a key for the load, and an admin key for the dashboards."""
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        "server": {"access_log": False},
        "limits": {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "max_concurrency": 4096},
        "providers": {
            "simulated": {"kind": "simulated", "tokens_per_second": 0},
            "fake": {"kind": "openai", "base_url": f"http://{HOST}:{upstream_port}/v1", "api_key": "sk-bench"},
        },
        "models": {
            **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
            MODEL: {"provider": "fake", "input_usd_per_mtok": "1.0", "output_usd_per_mtok": "2.0"},
        },
    }
    env = write_config(workdir / "pacemaker.yaml", config)
    pacemaker_cli(env, "migrate")
    key = json.loads(pacemaker_cli(env, "keys", "create", "--name", "load", "--json"))["key"]
    admin = json.loads(pacemaker_cli(env, "keys", "create", "--name", "dashboards", "--admin", "--json"))["key"]
    return serve_pacemaker("pacemaker", env, workdir / "pacemaker.log", children), key, admin


class Dashboards:
    """N activity-feed subscribers, each reading and decoding every message as the page does."""

    def __init__(self, url: str, admin_key: str, count: int) -> None:
        self._url, self._key, self._count = url, admin_key, count
        self.received = [0] * count
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: list[asyncio.Event] = []

    async def __aenter__(self) -> Dashboards:
        for index in range(self._count):
            ready = asyncio.Event()
            self._ready.append(ready)
            self._tasks.append(asyncio.create_task(self._follow(index, ready)))
        # Every dashboard has had its first snapshot (the feed ticks once a second) before the load starts.
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in self._ready)), timeout=10)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, index: int, ready: asyncio.Event) -> None:
        async with websockets.connect(self._url, subprotocols=["pacemaker.bearer", self._key], max_size=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "topic": "activity"}))
            async for message in ws:
                if orjson.loads(message).get("type") == "activity.snapshot":
                    self.received[index] += 1
                    ready.set()


async def run_row(server: Child, key: str, admin: str, dashboards: int, args: argparse.Namespace, round_no: int) -> Row:
    url = f"http://{HOST}:{server.port}{PATH}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    row = Row(dashboards=dashboards, round_no=round_no)
    async with Dashboards(f"ws://{HOST}:{server.port}/v1/ws", admin, dashboards) as clients:
        before = list(clients.received)
        await closed_loop(row, url, BODY, headers, valid, CONCURRENCY, args.warmup, args.seconds, server, [server])
        row.snapshots = [after - was for after, was in zip(clients.received, before, strict=True)]
    return row


async def idle_cpu(server: Child, admin: str, dashboards: int, seconds: float) -> tuple[float, list[int]]:
    """The server's CPU seconds per second with no load and N dashboards: the feed alone, free of load noise."""
    async with Dashboards(f"ws://{HOST}:{server.port}/v1/ws", admin, dashboards) as clients:
        before, received = server.cpu_seconds(), list(clients.received)
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        used, elapsed = server.cpu_seconds() - before, time.perf_counter() - started
        return used / elapsed, [after - was for after, was in zip(clients.received, received, strict=True)]


# --- part C: in process -----------------------------------------------------------------------------


def observe_cost_us(calls: int, repeats: int) -> dict[str, float]:
    """Activity.observe() of a chat completion's audit row, per call (median of repeats), in microseconds."""
    row: dict[str, Any] = {
        "route": PATH,
        "transport": "openai",
        "model": MODEL,
        "status": "completed",
        "error_code": None,
        "http_status": 200,
        "prompt_tokens": 25,
        "completion_tokens": 12,
        "cost_usd": Decimal("0.000049"),
        "latency_ms": 12.5,
        "ttft_ms": 3.1,
    }
    activity = Activity("bench")
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            activity.observe(row)
        timings.append((time.perf_counter() - started) / calls * 1e6)
    return {"observe_us": statistics.median(timings)}


def loaded_tick_ms(requests_per_s: int, repeats: int) -> float:
    """One tick's report and merge (and its encoding) with a full minute of counters behind it, in ms.

    The feed does this once a second, dashboards or not; its gauges (a few attribute reads) are left out.
    """
    clock = [1_000_000.0]
    activity = Activity("bench", lambda: clock[0])
    for second in range(61):
        clock[0] = 1_000_000.0 + second
        for n in range(requests_per_s):
            latency = 5.0 + (n % 200)  # a spread of buckets, as real latencies have
            row = {
                "model": MODEL if n % 4 else "sim-small",
                "status": "completed" if n % 50 else "failed",
                "error_code": None if n % 50 else "upstream_error",
                "http_status": 200 if n % 50 else 502,
                "transport": "openai",
                "prompt_tokens": 25,
                "completion_tokens": 12,
                "cost_usd": Decimal("0.000049"),
                "latency_ms": latency,
                "ttft_ms": latency / 3,
            }
            activity.observe(row)
    gauges = {"websockets": 20, "sandbox": None, "audit": {"queue_depth": 3, "database_ok": True}}
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        report = activity.report()
        report.update(instance="bench", at=clock[0], gauges=gauges, breakers=[], limiter={"degraded": False})
        orjson.dumps(merge([report], {MODEL: 1.0}, shared="none"))
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


# --- report ------------------------------------------------------------------------------------


def medians(rows: Sequence[Row]) -> dict[int, tuple[Row, list[float]]]:
    chosen = {}
    for count in sorted({row.dashboards for row in rows}):
        runs = sorted((row for row in rows if row.dashboards == count), key=lambda row: row.rps)
        chosen[count] = (runs[(len(runs) - 1) // 2], [row.rps for row in rows if row.dashboards == count])
    return chosen


def paired_ratio(rows: Sequence[Row], count: int) -> float:
    """The median over rounds of req/s with `count` dashboards over req/s with none, in the same round."""
    ratios = []
    for row in rows:
        if row.dashboards == count:
            base = [other for other in rows if other.dashboards == 0 and other.round_no == row.round_no]
            if base and base[0].rps:
                ratios.append(row.rps / base[0].rps)
    return statistics.median(ratios) if ratios else float("nan")


def render(
    rows: Sequence[Row],
    idle: dict[int, tuple[float, list[int]]],
    in_process: dict[str, float],
    args: argparse.Namespace,
    pinning: bool,
) -> str:
    chosen = medians(rows)
    most = max(args.dashboards)
    lines = [
        "### The activity feed: JSON c=64 chat completions with 0, 1 and 20 dashboards connected",
        "",
        f"{platform.python_implementation()} {platform.python_version()}, {psutil.cpu_count()} CPUs"
        f" ({'server pinned to CPU 0, the rest to CPU 1' if pinning else 'not pinned'}), one uvicorn worker,"
        f" {args.warmup:g} s warm-up + {args.seconds:g} s measured per row, median of {args.rounds} rounds by req/s.",
        "",
        "| dashboards | req/s | req/s, all rounds | vs none, same round (median) | p50 ms | p99 ms |"
        " server CPU ms/req | server CPU % | other CPU % | snapshots per dashboard | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, (row, all_rps) in chosen.items():
        snapshots = f"{min(row.snapshots)}-{max(row.snapshots)}" if row.snapshots else "-"
        errors = sum(sum(r.errors.values()) for r in rows if r.dashboards == count)
        ratio = fmt(paired_ratio(rows, count), 3) if count else ""
        lines.append(
            f"| {count} | {fmt(row.rps, 0)} | {' / '.join(fmt(x, 0) for x in all_rps)} | {ratio}"
            f" | {fmt(row.percentile(50))} | {fmt(row.percentile(99))} | {fmt(row.server_cpu_ms_per_request, 3)}"
            f" | {fmt(100 * row.server_cpu_s / row.window_s, 0)} | {fmt(100 * row.other_cpu_s / row.window_s, 0)}"
            f" | {snapshots} | {errors} |"
        )
    lines += [
        "",
        f"The server with no load and N dashboards ({args.idle:g} s each): the feed's own CPU, free of load noise.",
        "",
        "| dashboards | server CPU, % of a core | snapshots per dashboard |",
        "|---:|---:|---:|",
    ]
    for count, (cpu, snapshots) in idle.items():
        received = f"{min(snapshots)}-{max(snapshots)}" if snapshots else "-"
        lines.append(f"| {count} | {fmt(100 * cpu, 3)} | {received} |")
    lines += ["", "| check | measured | target | verdict |", "|---|---:|---|---|"]
    if 0 in chosen and most in chosen and most:
        loss = 1 - paired_ratio(rows, most)
        lines.append(
            f"| throughput lost with {most} dashboards under load (median of paired rounds) | {fmt(100 * loss, 1)} %"
            f" | < {TARGET_LOSS:.0%} | {verdict(loss < TARGET_LOSS)} |"
        )
    if 0 in idle and most in idle and most:
        share = idle[most][0] - idle[0][0]
        lines.append(
            f"| CPU {most} dashboards add, idle server (% of the one core a saturated server has)"
            f" | {fmt(100 * share, 3)} % | < {TARGET_LOSS:.0%} | {verdict(share < TARGET_LOSS)} |"
        )
    observe, tick = in_process["observe_us"], in_process["tick_ms"]
    lines.append(f"| Activity.observe() per request, in process | {fmt(observe, 2)} us | (info) |  |")
    if 0 in chosen:
        per_request = chosen[0][0].server_cpu_ms_per_request * 1000
        lines.append(
            f"| ... as a share of a request's server CPU | {fmt(100 * observe / per_request, 2)} % | (info) |  |"
        )
    lines.append(
        f"| one tick's report, merge and encoding with a full minute at {args.tick_rps:,} req/s | {fmt(tick, 2)} ms"
        f" (once a second: {fmt(tick / 10, 3)} % of a core) | (info) |  |"
    )
    return "\n".join(lines) + "\n"


def problems(
    rows: Sequence[Row],
    idle: dict[int, tuple[float, list[int]]],
    in_process: dict[str, float],
    args: argparse.Namespace,
) -> list[str]:
    found = []
    for row in rows:
        label = f"round {row.round_no}, {row.dashboards} dashboards"
        found += row.problems(label)
        # A full row spans several ticks: each dashboard must have had (nearly) every one.
        wanted = max(0, int(args.seconds) - 1) if not args.smoke else 0
        short = [n for n in row.snapshots if n < wanted]
        if short:
            found.append(f"{label}: {len(short)} dashboards got fewer than {wanted} snapshots ({short[:5]})")
    for round_no in range(1, args.rounds + 1):
        for count in args.dashboards:
            if not any(row.round_no == round_no and row.dashboards == count for row in rows):
                found.append(f"round {round_no}, {count} dashboards: no figures")
    for count in args.dashboards:
        if count not in idle:
            found.append(f"idle, {count} dashboards: no figures")
        elif count and min(idle[count][1]) < max(1, int(args.idle) - 1):
            found.append(f"idle, {count} dashboards: a dashboard missed its snapshots ({idle[count][1][:5]})")
    found += [f"in process: {name} could not be computed" for name, value in in_process.items() if value != value]
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="repeat every row; the median is shown (default 5)")
    parser.add_argument("--dashboards", default="0,1,20", help="comma-separated dashboard counts (default 0,1,20)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of each idle measurement (default 10)")
    parser.add_argument(
        "--tick-rps", type=int, default=2_500, help="requests per second behind the in-process tick (default 2500)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin, args.idle, args.tick_rps = 0.5, 0.2, 1, True, 2.0, 100
    if not (0.5 <= args.seconds <= 600 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 20):
        parser.error("--seconds must be in [0.5, 600], --warmup in [0, 60], --rounds in [1, 20]")
    args.dashboards = [int(n) for n in args.dashboards.split(",") if n]
    if not args.dashboards or any(n < 0 or n > 500 for n in args.dashboards):
        parser.error("--dashboards: counts between 0 and 500")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-dashboard-"))
    children: list[Child] = []
    rows: list[Row] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            if not args.smoke:
                wait_for_quiet_machine()
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            server, key, admin = start_pacemaker(workdir, fake.port, children)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            runner.run(first_request("Pacemaker", f"http://{HOST}:{server.port}{PATH}", BODY, headers, valid, server))
            for round_no in range(1, args.rounds + 1):
                for count in args.dashboards:
                    if pinning:
                        pin_under_test(server, children)
                    log(f"round {round_no}/{args.rounds}  {count:3} dashboards ...")
                    row = runner.run(run_row(server, key, admin, count, args, round_no))
                    rows.append(row)
                    log(
                        f"{'':20} {row.rps:,.0f} req/s, p50 {row.percentile(50):.2f} ms,"
                        f" {row.server_cpu_ms_per_request:.3f} CPU ms/req, snapshots {row.snapshots[:3]}..."
                    )
            idle: dict[int, tuple[float, list[int]]] = {}
            for count in args.dashboards:
                if pinning:
                    pin_under_test(server, children)
                log(f"idle server, {count:3} dashboards, {args.idle:g} s ...")
                idle[count] = runner.run(idle_cpu(server, admin, count, args.idle))
                log(f"{'':20} {100 * idle[count][0]:.3f} % of a core")
            log("in process: Activity.observe() and one tick")
            in_process = observe_cost_us(OBSERVE_CALLS // 20 if args.smoke else OBSERVE_CALLS, 1 if args.smoke else 5)
            in_process["tick_ms"] = loaded_tick_ms(args.tick_rps, 3 if args.smoke else 15)
            failures = problems(rows, idle, in_process, args)
            print(render(rows, idle, in_process, args, pinning))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
