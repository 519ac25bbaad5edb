"""Benchmark the code sandbox: cold start with and without the module cache, warm latency, throughput.

    .venv/bin/python -m benchmarks.sandbox [--warm-runs 50] [--throughput-runs 40] [--rounds 3]

Cold start is measured in fresh child processes (`--child <cache_dir>`), so it includes importing
wasmtime and the app, hashing the runtime, `Sandbox.start()` and one first `print(1+1)`:
- without the cache: a new empty cache dir, so start() runs the compile subprocess;
- with the cache: the same dir again, so start() only verifies and mmaps the artifact.

Warm latency: one started Sandbox, `print(1+1)` run one at a time with every limit on (10 s epoch
deadline, 20e9 fuel, 256 MiB memory, 1 MiB per output stream, the sleep guard). Throughput:
--throughput-runs `print(1+1)` submitted at once to a Sandbox with 1 and then 2 workers, in
--rounds alternating rounds (this VM's second core comes and goes; medians within one run).

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
from pathlib import Path

from app.sandbox import ExecutionLimits, Sandbox, SandboxSettings

LIMITS = ExecutionLimits(timeout_s=10, fuel=20_000_000_000, memory_mb=256, output_bytes=1024 * 1024)


def progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


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
    assert result.status == "ok", result
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
        [sys.executable, "-m", "benchmarks.sandbox", "--child", str(cache_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
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
            assert result.status == "ok" and result.stdout == "2\n", result
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
        assert all(r.status == "ok" for r in results)
        return runs / elapsed
    finally:
        await sandbox.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as scratch:
        cache_dir = Path(scratch) / "cache"
        progress("cold start without the cache (compiles in a subprocess)...")
        cold = cold_start(cache_dir)
        assert cold["compiled"], "a fresh cache dir must compile"
        progress("cold starts with the cache...")
        cached = [cold_start(cache_dir) for _ in range(5)]
        assert not any(c["compiled"] for c in cached)
        progress(f"warm latency over {args.warm_runs} runs...")
        warm = await warm_latency(cache_dir, args.warm_runs)
        progress("throughput...")
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
    row("with cache (median of 5)", median_cached)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--warm-runs", type=int, default=50)
    parser.add_argument("--throughput-runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child is not None:
        asyncio.run(child(arguments.child))
    else:
        asyncio.run(main(arguments))
