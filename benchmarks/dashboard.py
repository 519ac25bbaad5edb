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

Part B measures the feed's cost on the request path in process: Activity.observe() of an audit row
of a chat completion (what every request pays, dashboards or not), per call.

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


# --- part B: the request path, in process ------------------------------------------------------


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


# --- report ------------------------------------------------------------------------------------


def medians(rows: Sequence[Row]) -> dict[int, tuple[Row, list[float]]]:
    chosen = {}
    for count in sorted({row.dashboards for row in rows}):
        runs = sorted((row for row in rows if row.dashboards == count), key=lambda row: row.rps)
        chosen[count] = (runs[(len(runs) - 1) // 2], [row.rps for row in rows if row.dashboards == count])
    return chosen


def render(rows: Sequence[Row], part_b: dict[str, float], args: argparse.Namespace, pinning: bool) -> str:
    chosen = medians(rows)
    lines = [
        "### The activity feed: JSON c=64 chat completions with 0, 1 and 20 dashboards connected",
        "",
        f"{platform.python_implementation()} {platform.python_version()}, {psutil.cpu_count()} CPUs"
        f" ({'server pinned to CPU 0, the rest to CPU 1' if pinning else 'not pinned'}), one uvicorn worker,"
        f" {args.warmup:g} s warm-up + {args.seconds:g} s measured per row, median of {args.rounds} rounds by req/s.",
        "",
        "| dashboards | req/s | req/s, all rounds | p50 ms | p99 ms | server CPU ms/req | server CPU % |"
        " other CPU % | snapshots per dashboard | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, (row, all_rps) in chosen.items():
        snapshots = f"{min(row.snapshots)}-{max(row.snapshots)}" if row.snapshots else "-"
        errors = sum(sum(r.errors.values()) for r in rows if r.dashboards == count)
        lines.append(
            f"| {count} | {fmt(row.rps, 0)} | {' / '.join(fmt(x, 0) for x in all_rps)} | {fmt(row.percentile(50))}"
            f" | {fmt(row.percentile(99))} | {fmt(row.server_cpu_ms_per_request, 3)}"
            f" | {fmt(100 * row.server_cpu_s / row.window_s, 0)} | {fmt(100 * row.other_cpu_s / row.window_s, 0)}"
            f" | {snapshots} | {errors} |"
        )
    lines += ["", "| check | measured | target | verdict |", "|---|---:|---|---|"]
    base = chosen.get(0)
    for count, (row, _all) in chosen.items():
        if base is None or count == 0:
            continue
        loss = 1 - row.rps / base[0].rps if base[0].rps else float("nan")
        cpu = row.server_cpu_ms_per_request - base[0].server_cpu_ms_per_request
        target = f"< {TARGET_LOSS:.0%}" if count == max(chosen) else "(info)"
        outcome = verdict(loss < TARGET_LOSS) if count == max(chosen) else ""
        lines.append(f"| throughput lost with {count} dashboards | {fmt(100 * loss, 1)} % | {target} | {outcome} |")
        lines.append(f"| server CPU per request added, {count} dashboards | {fmt(cpu * 1000, 1)} us | (info) |  |")
    observe = part_b["observe_us"]
    lines.append(f"| Activity.observe() per request, in process | {fmt(observe, 2)} us | (info) |  |")
    if base is not None:
        share = observe / (base[0].server_cpu_ms_per_request * 1000)
        lines.append(f"| ... as a share of a request's server CPU | {fmt(100 * share, 2)} % | (info) |  |")
    return "\n".join(lines) + "\n"


def problems(rows: Sequence[Row], args: argparse.Namespace) -> list[str]:
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
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="repeat every row; the median is shown (default 5)")
    parser.add_argument("--dashboards", default="0,1,20", help="comma-separated dashboard counts (default 0,1,20)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin = 0.5, 0.2, 1, True
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
            log("part B: Activity.observe() in process")
            part_b = observe_cost_us(OBSERVE_CALLS // 20 if args.smoke else OBSERVE_CALLS, 1 if args.smoke else 5)
            failures = problems(rows, args)
            if any(n != n for n in part_b.values()):
                failures.append("part B: a figure could not be computed")
            print(render(rows, part_b, args, pinning))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
