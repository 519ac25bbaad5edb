"""`make bench`: every performance target in one run, each benchmark's tables, then one table of verdicts.

    .venv/bin/python -m benchmarks.targets [--only NAME,...] [--smoke]

Runs, one after another (never side by side: they would share the CPUs), each benchmark below as
its own process, prints its markdown as it is, and then gathers the rows of every
`| check | measured | target | verdict |` table into one, named by the run they came from:

  chat      benchmarks.chat_proxy: JSON at c=1 and c=64, SSE on both streaming routes, against the
            bare proxy and the upstream, Pacemaker on the embedded defaults (SQLite audit, in-process
            limits) and with the audit log in PostgreSQL and the limits in Redis (targets 1 and 2)
  latency   benchmarks.latency_ab: the added p50 at c=1 with the targets interleaved request by
            request (the figure for target 1's second half on a shared machine)
  latency-pg-redis  the same with the audit log in PostgreSQL and the limits in Redis
  memory    benchmarks.memory: idle RSS after warm-up, the sandbox enabled (target 4)
  workers   benchmarks.workers: one worker against two, CPU per request (target 5)

The held streams (target 3 and the held half of target 2) take many minutes of their own:
`make bench-held` (benchmarks.held).
--smoke passes --smoke on (seconds each; the figures mean nothing). The exit status is 1 when a
benchmark failed or printed no checks; a missed target is a verdict, not a failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.harness import ROOT, log


@dataclass(frozen=True)
class Run:
    name: str
    module: str
    args: tuple[str, ...] = ()


RUNS = (
    Run("chat", "benchmarks.chat_proxy"),
    Run("latency", "benchmarks.latency_ab"),
    Run("latency-pg-redis", "benchmarks.latency_ab", ("--backend", "postgres-redis")),
    Run("memory", "benchmarks.memory"),
    Run("workers", "benchmarks.workers"),
)
CHECKS_HEADER = "| check | measured | target | verdict |"


def checks(markdown: str) -> list[tuple[str, str, str, str]]:
    """The rows of every checks table in one benchmark's output."""
    rows: list[tuple[str, str, str, str]] = []
    inside = False
    for line in markdown.splitlines():
        if line.strip() == CHECKS_HEADER:
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) == 4:
                rows.append((cells[0], cells[1], cells[2], cells[3]))
            continue
        inside = False
    return rows


def run(benchmark: Run, smoke: bool) -> tuple[int, str]:
    args = [sys.executable, "-m", benchmark.module, *benchmark.args, *(["--smoke"] if smoke else [])]
    log(f"== {benchmark.name}: {' '.join(args[1:])}")
    # stderr (progress) goes straight through; stdout is the markdown, gathered.
    done = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    return done.returncode, done.stdout


def summary(results: Sequence[tuple[Run, int, str]]) -> str:
    lines = ["## Targets", "", "| run | check | measured | target | verdict |", "|---|---|---:|---|---|"]
    for benchmark, status, output in results:
        found = checks(output)
        if status != 0:
            lines.append(f"| {benchmark.name} | (the benchmark exited {status}) | | | **failed** |")
        for check, measured, target, outcome in found:
            lines.append(f"| {benchmark.name} | {check} | {measured} | {target} | {outcome} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated run names or modules (default: all)")
    parser.add_argument("--smoke", action="store_true", help="every benchmark in its smoke mode (seconds)")
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    chosen = [r for r in RUNS if not wanted or r.name in wanted or r.module.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        parser.error(f"--only {args.only!r} names none of: {', '.join(r.name for r in RUNS)}")
    results: list[tuple[Run, int, str]] = []
    for benchmark in chosen:
        status, output = run(benchmark, args.smoke)
        print(f"## {benchmark.name}\n\n{output}", flush=True)
        results.append((benchmark, status, output))
    print(summary(results), flush=True)
    broken = [b.name for b, status, output in results if status != 0 or not checks(output)]
    if broken:
        log(f"failed or without checks: {', '.join(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
