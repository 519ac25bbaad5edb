"""Benchmark the code sandbox: cold start with and without the module cache, warm latency, throughput.

    .venv/bin/python -m benchmarks.sandbox [--warm-runs 50] [--throughput-runs 40] [--rounds 3] [--smoke]

Cold start is measured in fresh child processes (`--child <cache_dir>`), so it includes importing
wasmtime and the app, hashing the runtime, `Sandbox.start()` and one first `print(1+1)`:
- without the cache: a new empty cache dir, so start() runs the compile subprocess;
- with the cache: the same dir again, so start() only verifies and mmaps the artifact.

Warm latency: one started Sandbox, `print(1+1)` run one at a time with every limit on (10 s epoch
deadline, 20e9 fuel, 256 MiB memory, 1 MiB per output stream, the sleep guard). Throughput:
--throughput-runs `print(1+1)` submitted at once to a Sandbox with 1 and then 2 workers, in
--rounds alternating rounds (this VM's second core comes and goes; medians within one run).

--smoke runs every part with the fewest runs (seconds, most of them the compile; figures mean
nothing). Either way the exit status is 1 if an execution failed or a figure could not be computed.
Everything printed on stdout is markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from app.sandbox import ExecutionLimits, Sandbox, SandboxSettings
from benchmarks.harness import exit_status, log, not_finite

LIMITS = ExecutionLimits(timeout_s=10, fuel=20_000_000_000, memory_mb=256, output_bytes=1024 * 1024)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def child(cache_dir: Path) -> None:
    """One cold start, timed from inside a fresh process; prints one JSON line."""
    began = time.perf_counter()
    settings = SandboxSettings(cache_dir=cache_dir, workers=2)
    sandbox = Sandbox(settings)
    startup = await sandbox.start()
    started = time.perf_counter()
    result = await sandbox.execute("print(1+1)", LIMITS)
    first = time.perf_counter()
    rss = rss_mib()
    await sandbox.close()
    if result.status != "ok":
        raise RuntimeError(f"the first execution failed: {result}")
    print(
        json.dumps(
            {
                "compiled": startup.compiled,
                "start_s": started - began,
                "first_ms": (first - started) * 1000,
                "rss_mib": rss,
            }
        )
    )


def cold_start(cache_dir: Path) -> dict[str, float]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sandbox", "--child", str(cache_dir)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the cold-start process exited with {done.returncode}:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - began
    return figures


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def warm_latency(cache_dir: Path, runs: int) -> list[float]:
    sandbox = Sandbox(SandboxSettings(cache_dir=cache_dir, workers=2))
    await sandbox.start()
    try:
        for _ in range(3):  # first runs touch pages of the mmapped artifact
            await sandbox.execute("print(1+1)", LIMITS)
        timings = []
        for _ in range(runs):
            began = time.perf_counter()
            result = await sandbox.execute("print(1+1)", LIMITS)
            timings.append((time.perf_counter() - began) * 1000)
            if result.status != "ok" or result.stdout != "2\n":
                raise RuntimeError(f"a warm execution failed: {result}")
        return timings
    finally:
        await sandbox.close()


async def throughput(cache_dir: Path, workers: int, runs: int) -> float:
    sandbox = Sandbox(SandboxSettings(cache_dir=cache_dir, workers=workers, queue_limit=runs))
    await sandbox.start()
    try:
        await sandbox.execute("print(1+1)", LIMITS)
        began = time.perf_counter()
        results = await asyncio.gather(*(sandbox.execute("print(1+1)", LIMITS) for _ in range(runs)))
        elapsed = time.perf_counter() - began
        if failed := [r for r in results if r.status != "ok"]:
            raise RuntimeError(f"{len(failed)} of {runs} executions failed ({workers} workers), e.g. {failed[0]}")
        return runs / elapsed
    finally:
        await sandbox.close()


async def run(args: argparse.Namespace) -> list[str]:
    """Measure and print the tables; what made a figure meaningless, if anything."""
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as scratch:
        cache_dir = Path(scratch) / "cache"
        log("cold start without the cache (compiles in a subprocess)...")
        cold = cold_start(cache_dir)
        if not cold["compiled"]:
            raise RuntimeError("a fresh cache dir did not compile")
        log("cold starts with the cache...")
        cached = [cold_start(cache_dir) for _ in range(args.cold_runs)]
        if any(c["compiled"] for c in cached):
            raise RuntimeError("a start with the cache compiled again")
        log(f"warm latency over {args.warm_runs} runs...")
        warm = await warm_latency(cache_dir, args.warm_runs)
        log("throughput...")
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for workers in (1, 2):
                rates[workers].append(await throughput(cache_dir, workers, args.throughput_runs))

    cpus = len(os.sched_getaffinity(0))
    print(f"## Sandbox benchmark ({cpus} CPUs, wasmtime 50.0.1, CPython 3.12.0 for WASI)\n")
    print("### Cold start, in a fresh process\n")
    print("`start()`: hash check, cache check, load, ticker; whole process: interpreter, imports, start, run, close.\n")
    print("| case | `Sandbox.start()` | first `print(1+1)` | whole process | RSS after first run |")
    print("|---|---|---|---|---|")

    def row(name: str, c: dict[str, float]) -> None:
        print(
            f"| {name} | {c['start_s'] * 1000:.0f} ms | {c['first_ms']:.0f} ms | "
            f"{c['process_s'] * 1000:.0f} ms | {c['rss_mib']:.0f} MiB |"
        )

    row("no cache (compile subprocess)", cold)
    median_cached = {
        key: statistics.median(c[key] for c in cached) for key in ("start_s", "first_ms", "process_s", "rss_mib")
    }
    row(f"with cache (median of {args.cold_runs})", median_cached)
    print(f"\n### Warm `print(1+1)`, all limits on ({args.warm_runs} sequential runs)\n")
    print("| p50 | p90 | p99 | min | max |")
    print("|---|---|---|---|---|")
    print(
        f"| {percentile(warm, 0.5):.1f} ms | {percentile(warm, 0.9):.1f} ms | {percentile(warm, 0.99):.1f} ms "
        f"| {min(warm):.1f} ms | {max(warm):.1f} ms |"
    )
    print(f"\n### Throughput, {args.throughput_runs} × `print(1+1)` at once (median of {args.rounds} rounds)\n")
    print("| workers | executions/s | rounds |")
    print("|---|---|---|")
    for workers, values in rates.items():
        print(f"| {workers} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    speedup = statistics.median(rates[2]) / statistics.median(rates[1])
    print(f"\nSpeed-up with 2 workers: {speedup:.2f}×.")
    figures = {"cold start": cold["start_s"], "cached start": median_cached["start_s"], "speed-up": speedup}
    figures |= {"warm p50": percentile(warm, 0.5), "warm p99": percentile(warm, 0.99)}
    return [f"{name} could not be computed" for name in not_finite(figures)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--warm-runs", type=int, default=50)
    parser.add_argument("--throughput-runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=5, help="cold starts with the cache (default 5)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every part with the fewest runs")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.warm_runs, args.throughput_runs, args.rounds, args.cold_runs = 5, 4, 1, 1
    if min(args.warm_runs, args.throughput_runs, args.rounds, args.cold_runs) < 1:
        parser.error("--warm-runs, --throughput-runs, --rounds and --cold-runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        asyncio.run(child(args.child))
        return 0
    return exit_status(asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
