"""Benchmark `pacemaker serve --workers 2` against one worker: server CPU per request and req/s, chat JSON c=64.

    .venv/bin/python -m benchmarks.workers [--rounds 5] [--seconds 5] [--warmup 1] [--smoke]

Starts the fake upstream (tests/fakes/upstream.py), a redis-server of its own and two Pacemaker
servers on the same settings (SQLite in a temporary directory each, limits in that Redis, as more
than one worker requires, and server.metrics off, which it requires too): one `serve --workers 1`,
one `serve --workers 2`. Both run throughout; the closed-loop load (benchmarks/loadgen.py: asyncio
+ aiohttp on uvloop, in this process) drives one at a time, POST /v1/chat/completions at
concurrency 64, in paired rounds (1 worker then 2 workers, the order alternating each round), so
that every ratio compares two runs close in time.

Server CPU is the user+system time of every process of that server (uvicorn's supervisor and its
workers, psutil children) over the measured window, divided by the requests completed in it. The
check: the median over rounds of each pair's ratio, CPU per request with 2 workers / with 1, is
<= 1.10. Nothing is pinned: two workers need both of this machine's CPUs, which they share with
the load generator and the fake upstream, so the req/s say what the machine does, not what two
cores of server would.

--smoke runs one short round (seconds; figures mean nothing). Either way the exit status is 1 if a
row is missing, had a failed request, or has a figure that could not be computed. Everything
printed on stdout is markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from benchmarks.harness import (
    HOST,
    Child,
    clean_up,
    exit_status,
    fmt,
    free_port,
    log,
    new_loop,
    pacemaker_cli,
    start_fake_upstream,
    start_redis,
    terminate_on_sigterm,
    verdict,
    write_config,
)
from benchmarks.loadgen import Window, closed_loop, first_request

PATH = "/v1/chat/completions"
MODEL = "fake-model"
CONCURRENCY = 64
CPU_RATIO_TARGET = 1.10
BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name twelve Greek letters, please."},
        ],
    }
)


def valid(status: int, body: bytes) -> bool:
    return status == 200 and b'"choices"' in body and b"alpha" in body


class Server(Child):
    """A `pacemaker serve --workers N`: its CPU is that of the supervisor and every worker process."""

    workers: int = 1

    def cpu_seconds(self) -> float:
        total = 0.0
        try:
            processes = [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return float("nan")
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue  # a worker that exited: its CPU is lost, and the row says so by its figures
            total += times.user + times.system
        return total

    def worker_pids(self) -> list[int]:
        try:
            return [p.pid for p in self.process.children(recursive=True)]
        except psutil.Error:
            return []


def start_pacemaker(
    workdir: Path, workers: int, upstream_port: int, redis_port: int, children: list[Child]
) -> tuple[Server, str]:
    """`pacemaker serve --workers N` on its own SQLite database; returns it and an API key."""
    own = workdir / f"workers-{workers}"
    own.mkdir()
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{own / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(own / "dev-key")},
        "audit": {"spool_dir": str(own / "audit-spool")},
        "tasks": {"spool_dir": str(own / "task-spool")},
        "sandbox": {"sessions_dir": str(own / "sandbox-sessions")},
        "server": {"access_log": False, "metrics": False},
        # Enforcement stays on (its cost is part of what is measured) with limits the load never reaches;
        # each server counts under a prefix of its own in the one Redis.
        "limits": {
            "rpm": 1_000_000_000,
            "tpm": 1_000_000_000_000,
            "max_concurrency": 4096,
            "redis_url": f"redis://{HOST}:{redis_port}/{workers}",
        },
        "providers": {
            "simulated": {"kind": "simulated", "tokens_per_second": 0},
            "fake": {"kind": "openai", "base_url": f"http://{HOST}:{upstream_port}/v1", "api_key": "sk-bench"},
        },
        "models": {
            **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
            MODEL: {"provider": "fake", "input_usd_per_mtok": "1.0", "output_usd_per_mtok": "2.0"},
        },
    }
    env = write_config(own / "pacemaker.yaml", config)
    pacemaker_cli(env, "migrate")
    key: str = json.loads(pacemaker_cli(env, "keys", "create", "--name", "bench", "--json"))["key"]
    port = free_port()
    args = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)]
    server = Server(f"pacemaker, {workers} worker{'s' if workers > 1 else ''}", args, env, own / "serve.log", port)
    server.workers = workers
    children.append(server)
    server.wait_for_port()
    return server, key


@dataclass(kw_only=True)
class Result(Window):
    workers: int
    round_no: int


async def wait_for_workers(server: Server, key: str) -> None:
    """Until every worker has started (uvicorn opens the port before they all serve) and answers."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = f"http://{HOST}:{server.port}{PATH}"
    for _ in range(600):
        if len(server.worker_pids()) >= server.workers or server.workers == 1:
            break
        await asyncio.sleep(0.05)
    # Enough requests that each worker has served some (the kernel spreads connections over them).
    for _ in range(4 * server.workers):
        await first_request(server.name, url, BODY, headers, valid, server)


async def run_load(
    server: Server, key: str, round_no: int, warmup_s: float, seconds: float, children: Sequence[Child]
) -> Result:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    run = Result(workers=server.workers, round_no=round_no)
    url = f"http://{HOST}:{server.port}{PATH}"
    return await closed_loop(run, url, BODY, headers, valid, CONCURRENCY, warmup_s, seconds, server, children)


def render(results: Sequence[Result], args: argparse.Namespace) -> tuple[str, float]:
    by_round: dict[int, dict[int, Result]] = {}
    for r in results:
        by_round.setdefault(r.round_no, {})[r.workers] = r
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"### `pacemaker serve --workers 2` vs one worker: POST {PATH}, JSON c={CONCURRENCY}",
        "",
        f"{cpus} CPUs for the servers, the load generator and the fake upstream together (nothing pinned);"
        f" limits in Redis and /metrics off for both (what more than one worker needs); {args.warmup:g} s warm-up"
        f" + {args.seconds:g} s measured per row, {args.rounds} paired round{'s' if args.rounds > 1 else ''}.",
        "",
        "| round | workers | req/s | p50 ms | p99 ms | server CPU ms/req | server CPU % | loadgen CPU % |"
        " other CPU % | errors | CPU/req 2w / 1w |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios: list[float] = []
    for round_no, pair in sorted(by_round.items()):
        one, two = pair.get(1), pair.get(2)
        ratio = (
            two.server_cpu_ms_per_request / one.server_cpu_ms_per_request
            if one and two and one.server_cpu_ms_per_request
            else float("nan")
        )
        ratios.append(ratio)
        for r in (one, two):
            if r is None:
                continue
            lines.append(
                f"| {round_no} | {r.workers} | {fmt(r.rps, 0)} | {fmt(r.percentile(50))} | {fmt(r.percentile(99))}"
                f" | {fmt(r.server_cpu_ms_per_request, 3)} | {fmt(100 * r.server_cpu_s / r.window_s, 0)}"
                f" | {fmt(100 * r.loadgen_cpu_s / r.window_s, 0)} | {fmt(100 * r.other_cpu_s / r.window_s, 0)}"
                f" | {sum(r.errors.values())} | {fmt(ratio, 3) if r is two else ''} |"
            )

    def median_of(workers: int, figure: str) -> float:
        values = [getattr(pair[workers], figure) for pair in by_round.values() if workers in pair]
        return statistics.median(values) if values else float("nan")

    finite = [r for r in ratios if r == r]
    ratio = statistics.median(finite) if finite else float("nan")
    spread = f"{min(finite):.3f}-{max(finite):.3f}" if finite else "n/a"
    rps1, rps2 = median_of(1, "rps"), median_of(2, "rps")
    cpu1, cpu2 = median_of(1, "server_cpu_ms_per_request"), median_of(2, "server_cpu_ms_per_request")
    other = statistics.median(100 * r.other_cpu_s / r.window_s for r in results) if results else float("nan")
    lines += [
        "",
        "Server CPU % is of one core, summed over the server's processes. Other CPU % is busy time of the machine"
        " outside this benchmark during the row (other benchmarks): rows with much of it are noise.",
        "",
        "| check | measured | target | verdict |",
        "|---|---:|---|---|",
        f"| CPU per request, 2 workers / 1 worker (median of the rounds' ratios; rounds {spread}) | {fmt(ratio, 3)}"
        f" | <= {CPU_RATIO_TARGET:.2f} | {verdict(ratio <= CPU_RATIO_TARGET)} |",
        f"| server CPU per request, 1 worker / 2 workers (medians) | {fmt(cpu1, 3)} / {fmt(cpu2, 3)} ms | (info) | |",
        f"| req/s, 1 worker / 2 workers (medians) | {fmt(rps1, 0)} / {fmt(rps2, 0)} | (info) | |",
        f"| req/s, 2 workers / 1 worker | {fmt(rps2 / rps1 if rps1 else float('nan'))} | (info) | |",
        f"| other CPU on the machine during the rows (median) | {fmt(other, 0)} % | (info) | |",
    ]
    failed = sum(sum(r.errors.values()) for r in results)
    if failed:
        lines += ["", f"**{failed} requests failed** (see stderr): the rows with errors are void."]
    return "\n".join(lines) + "\n", ratio


def problems(results: Sequence[Result], args: argparse.Namespace, ratio: float) -> list[str]:
    found = [p for r in results for p in r.problems(f"round {r.round_no}, {r.workers} workers")]
    seen = {(r.round_no, r.workers) for r in results}
    found += [
        f"round {n}, {w} workers: no figures" for n in range(1, args.rounds + 1) for w in (1, 2) if (n, w) not in seen
    ]
    if ratio != ratio:
        found.append("the CPU-per-request ratio could not be computed")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--smoke", action="store_true", help="seconds: one short round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds = 0.5, 0.2, 1
    if not (0.5 <= args.seconds <= 600 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 50):
        parser.error("--seconds must be in [0.5, 600], --warmup in [0, 60], --rounds in [1, 50]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-workers-"))
    children: list[Child] = []
    results: list[Result] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            redis = start_redis(workdir, children)
            servers = {n: start_pacemaker(workdir, n, fake.port, redis.port, children) for n in (1, 2)}
            for server, key in servers.values():
                runner.run(wait_for_workers(server, key))
            log(f"2-worker server: supervisor {servers[2][0].popen.pid}, workers {servers[2][0].worker_pids()}")
            for round_no in range(1, args.rounds + 1):
                order = (1, 2) if round_no % 2 else (2, 1)
                for workers in order:
                    server, key = servers[workers]
                    log(f"round {round_no}/{args.rounds}  {workers} worker(s) ...")
                    result = runner.run(run_load(server, key, round_no, args.warmup, args.seconds, children))
                    results.append(result)
                    log(
                        f"{'':20} {result.rps:,.0f} req/s, p50 {result.percentile(50):.2f} ms,"
                        f" {result.server_cpu_ms_per_request:.3f} server CPU ms/req,"
                        f" other CPU {100 * result.other_cpu_s / result.window_s:.0f} %"
                    )
                    for error, count in result.errors.most_common(3):
                        log(f"{'':20} {count} x {error}")
            table, ratio = render(results, args)
            print(table)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(problems(results, args, ratio))


if __name__ == "__main__":
    sys.exit(main())
