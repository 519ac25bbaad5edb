"""Added latency at concurrency 1, interleaved: the bare proxy and Pacemaker, request by request.

    .venv/bin/python -m benchmarks.latency_ab [--requests 10000] [--compare LABEL=DIR] [--smoke]

benchmarks.chat_proxy measures each target for a few seconds after the other; on a machine that
others share, the noise of those seconds differs from one target to the next, and at concurrency 1
the p50s then differ by more than what Pacemaker adds. Here one client sends the same JSON chat
completion to each target in turn (the order alternating), one request at a time, so that whatever
the machine does falls on all of them alike; the added p50 is Pacemaker's p50 less the bare proxy's.

Both servers are pinned to CPU 0 (with two or more CPUs; --no-pin turns that off), the fake upstream
and this client to CPU 1. --compare LABEL=DIR adds Pacemaker from another checkout (a `git worktree`
of an earlier commit), as chat_proxy's does. --backend postgres-redis serves every Pacemaker with its
audit log and task records in PostgreSQL and its limits in Redis (each its own database and
redis-server). --smoke: a few requests each, unpinned (figures mean nothing). The exit status is 1
if a request failed. Stdout is markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson

from benchmarks.chat_proxy import BACKENDS, MESSAGES, MODEL, Databases, start_bare_proxy, start_pacemaker_on
from benchmarks.harness import (
    HOST,
    LOAD_CPU,
    SERVER_CPU,
    Child,
    can_pin,
    clean_up,
    fmt,
    log,
    new_loop,
    pin,
    start_fake_upstream,
    verdict,
)

PATH = "/v1/chat/completions"
TARGET_ADDED_P50_MS = 0.2  # issue 13, target 1
WARMUP = 300


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(targets: dict[str, tuple[str, dict[str, str]]], requests: int, warmup: int) -> dict[str, list[float]]:
    body = orjson.dumps({"model": MODEL, "messages": MESSAGES})
    timings: dict[str, list[float]] = {name: [] for name in targets}
    failures = 0
    sessions = {name: aiohttp.ClientSession() for name in targets}
    try:
        names = list(targets)
        for i in range(warmup + requests):
            for name in names if i % 2 == 0 else names[::-1]:
                url, headers = targets[name]
                started = time.perf_counter()
                async with sessions[name].post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
                elapsed_ms = (time.perf_counter() - started) * 1000
                if not ok:
                    failures += 1
                elif i >= warmup:
                    timings[name].append(elapsed_ms)
    finally:
        for session in sessions.values():
            await session.close()
    if failures:
        raise RuntimeError(f"{failures} requests failed")
    return timings


def table(timings: dict[str, list[float]], labels: dict[str, str], pinned: bool) -> str:
    bare = sorted(timings["bare"])
    lines = [
        "### Added latency at concurrency 1, interleaved (benchmarks/latency_ab.py)",
        "",
        f"One client, one request at a time to each target in turn, {len(bare)} each;"
        f" {'servers on CPU 0, upstream and client on CPU 1' if pinned else 'unpinned'}.",
        "",
        "| target | p25 ms | p50 ms | p90 ms | p99 ms | added p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, values in timings.items():
        ordered = sorted(values)
        shown = "" if name == "bare" else fmt(_percentile(ordered, 0.5) - _percentile(bare, 0.5), 3)
        lines.append(
            f"| {labels[name]} | {fmt(_percentile(ordered, 0.25), 3)} | {fmt(_percentile(ordered, 0.5), 3)}"
            f" | {fmt(_percentile(ordered, 0.9), 3)} | {fmt(_percentile(ordered, 0.99), 3)} | {shown} |"
        )
    added = _percentile(sorted(timings["pacemaker"]), 0.5) - _percentile(bare, 0.5)
    lines += [
        "",
        "| check | measured | target | verdict |",
        "|---|---:|---|---|",
        f"| {labels['pacemaker']} added p50, JSON c=1 (interleaved) | {fmt(added, 3)} ms | <= {TARGET_ADDED_P50_MS} ms"
        f" | {verdict(added <= TARGET_ADDED_P50_MS)} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="measured requests per target (default 10000)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR", help="another checkout")
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="embedded",
        help="every Pacemaker's backend (postgres-redis: a database and a redis-server of its own each)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--smoke", action="store_true", help="a few requests each, unpinned")
    args = parser.parse_args(argv)
    compare = [tuple(c.split("=", 1)) for c in args.compare]
    if any(len(c) != 2 or not (Path(c[1]) / "app").is_dir() for c in compare):
        parser.error("--compare takes LABEL=DIR, DIR a checkout (with app/)")
    requests, warmup = (30, 5) if args.smoke else (args.requests, WARMUP)
    pinned = not args.smoke and can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-latency-ab-"))
    children: list[Child] = []
    databases = Databases()

    try:
        log(f"starting servers in {workdir}")
        fake = start_fake_upstream(workdir, children)
        bare = start_bare_proxy(workdir, fake.port, children)
        servers: dict[str, tuple[Child, str | None]] = {"bare": (bare, None)}
        servers["pacemaker"] = start_pacemaker_on(
            args.backend, databases, workdir, fake.port, children, name="pacemaker"
        )
        for label, directory in compare:
            servers[label] = start_pacemaker_on(
                args.backend, databases, workdir, fake.port, children, name=label, code=Path(directory)
            )
        if pinned:
            for child, _key in servers.values():
                pin(child.process.pid, {SERVER_CPU})
            pin(fake.process.pid, {LOAD_CPU})
            pin(os.getpid(), {LOAD_CPU})
        targets = {
            name: (
                f"http://{HOST}:{child.port}{PATH}",
                {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
            )
            for name, (child, key) in servers.items()
        }
        backend = BACKENDS[args.backend]
        labels = {"bare": "bare proxy", "pacemaker": f"Pacemaker ({backend})" if backend else "Pacemaker"} | {
            label: f"Pacemaker ({label}{', ' + backend if backend else ''})" for label, _ in compare
        }
        log(f"{requests} requests to each of {len(targets)} targets, interleaved ...")
        loop = new_loop()
        try:
            timings = loop.run_until_complete(measure(targets, requests, warmup))
        finally:
            loop.close()
        sys.stdout.write(table(timings, labels, pinned))
        return 0
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        clean_up(children, workdir, keep=False)
        databases.drop_all()


if __name__ == "__main__":
    sys.exit(main())
