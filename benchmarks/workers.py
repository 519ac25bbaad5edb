"""Benchmark `pacemaker serve --workers 2` against one worker: server CPU per request and req/s, chat JSON c=64.

    .venv/bin/python -m benchmarks.workers [--rounds 5] [--seconds 5] [--warmup 1] [--smoke]

Starts the fake upstream (tests/fakes/upstream.py), a redis-server of its own and two Pacemaker
servers on the same settings (SQLite in a temporary directory each, limits in that Redis, as more
than one worker requires, and server.metrics off, which it requires too): one `serve --workers 1`,
one `serve --workers 2`; and, as the reference, the bare aiohttp proxy (benchmarks/bare_proxy.py)
under uvicorn with 1 and with 2 workers: what a second worker costs any Python proxy here. All
run throughout; the closed-loop load (benchmarks/loadgen.py: asyncio + aiohttp on uvloop, in this
process) drives one at a time, POST /v1/chat/completions at concurrency 64, in paired rounds (1
worker and 2 workers back to back, the order alternating each round), so that every ratio
compares two runs close in time.

Server CPU is the user+system time of every process of that server (uvicorn's supervisor and its
workers, psutil children) over the measured window, divided by the requests completed in it. The
check: the median over rounds of each pair's ratio, CPU per request with 2 workers / with 1, is
<= 1.10. Nothing is pinned: two workers need both of this machine's CPUs, which they share with
the load generator and the fake upstream, so the req/s say what the machine does, not what two
cores of server would.

Before the rounds it waits for other benchmarks to finish (--no-wait: not), and measures each
server's CPU while idle (its own timers, paid whatever the load; twice with two workers).

--smoke runs one short round (seconds; figures mean nothing). Either way the exit status is 1 if a
row is missing, had a failed request, or has a figure that could not be computed. Everything
printed on stdout is markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from benchmarks.harness import (
    HOST,
    Child,
    child_env,
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
    wait_for_quiet_machine,
    write_config,
)
from benchmarks.loadgen import Window, closed_loop, first_request

PATH = "/v1/chat/completions"
MODEL = "fake-model"
CONCURRENCY = 64
CPU_RATIO_TARGET = 1.10
IDLE_S = 5.0  # idle CPU of each server (timers of its own: load shedder, feeds, leases) over this long
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


def bare_app() -> Any:
    """`uvicorn --factory benchmarks.workers:bare_app`: the bare proxy (benchmarks/bare_proxy.py) on $BARE_UPSTREAM."""
    from benchmarks.bare_proxy import create_app

    return create_app(os.environ["BARE_UPSTREAM"])


def start_bare(workdir: Path, workers: int, upstream_port: int, children: list[Child]) -> Server:
    """The bare aiohttp proxy under uvicorn with N workers: how much a second worker costs any Python proxy here."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.workers:bare_app", "--host", HOST]
    args += ["--port", str(port), "--workers", str(workers), "--loop", "uvloop", "--http", "httptools"]
    args += ["--no-access-log", "--log-level", "warning"]
    env = child_env(BARE_UPSTREAM=f"http://{HOST}:{upstream_port}/v1")
    name = f"bare proxy, {workers} worker{'s' if workers > 1 else ''}"
    server = Server(name, args, env, workdir / f"bare-{workers}.log", port)
    server.workers = workers
    children.append(server)
    server.wait_for_port()
    return server


@dataclass(frozen=True)
class Target:
    key: str  # "pacemaker" or "bare"
    label: str
    server: Server
    headers: dict[str, str]

    @property
    def workers(self) -> int:
        return self.server.workers


@dataclass(kw_only=True)
class Result(Window):
    target: Target
    round_no: int


async def wait_for_workers(target: Target) -> None:
    """Until every worker has started (uvicorn opens the port before they all serve) and answers."""
    server = target.server
    headers = {"Content-Type": "application/json", **target.headers}
    url = f"http://{HOST}:{server.port}{PATH}"
    for _ in range(600):
        if len(server.worker_pids()) >= server.workers or server.workers == 1:
            break
        await asyncio.sleep(0.05)
    # Enough requests that each worker has served some (the kernel spreads connections over them).
    for _ in range(4 * server.workers):
        await first_request(server.name, url, BODY, headers, valid, server)


async def run_load(target: Target, round_no: int, warmup_s: float, seconds: float, children: Sequence[Child]) -> Result:
    headers = {"Content-Type": "application/json", **target.headers}
    run = Result(target=target, round_no=round_no)
    url = f"http://{HOST}:{target.server.port}{PATH}"
    return await closed_loop(run, url, BODY, headers, valid, CONCURRENCY, warmup_s, seconds, target.server, children)


def idle_cpu(targets: Sequence[Target], seconds: float) -> dict[tuple[str, int], float]:
    """Each server's CPU while nothing is sent, in ms per second, measured side by side."""
    before = {(t.key, t.workers): t.server.cpu_seconds() for t in targets}
    time.sleep(seconds)
    return {(t.key, t.workers): (t.server.cpu_seconds() - before[(t.key, t.workers)]) * 1000 / seconds for t in targets}


def ratios_of(results: Sequence[Result], key: str) -> list[float]:
    """Per round: CPU per request with 2 workers / with 1, for one target."""
    by_round: dict[int, dict[int, Result]] = {}
    for r in results:
        if r.target.key == key:
            by_round.setdefault(r.round_no, {})[r.target.workers] = r
    ratios = []
    for _round_no, pair in sorted(by_round.items()):
        one, two = pair.get(1), pair.get(2)
        if one and two and one.server_cpu_ms_per_request:
            ratios.append(two.server_cpu_ms_per_request / one.server_cpu_ms_per_request)
        else:
            ratios.append(float("nan"))
    return ratios


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def render(
    results: Sequence[Result], args: argparse.Namespace, idle: dict[tuple[str, int], float], idle_s: float
) -> tuple[str, float]:
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"### `pacemaker serve --workers 2` vs one worker: POST {PATH}, JSON c={CONCURRENCY}",
        "",
        f"{cpus} CPUs for the servers, the load generator and the fake upstream together (nothing pinned);"
        " Pacemaker with limits in Redis and /metrics off for both (what more than one worker needs), and the bare"
        f" aiohttp proxy under uvicorn as the reference; {args.warmup:g} s warm-up + {args.seconds:g} s measured per"
        f" row, {args.rounds} round{'s' if args.rounds > 1 else ''} (each: every row once, 1 and 2 workers"
        " back to back, the order alternating).",
        "",
        "| round | target | workers | req/s | p50 ms | p99 ms | server CPU ms/req | server CPU % | loadgen CPU % |"
        " other CPU % | errors | CPU/req 2w / 1w |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {key: ratios_of(results, key) for key in ("pacemaker", "bare")}
    for r in sorted(results, key=lambda r: (r.round_no, r.target.key != "pacemaker", r.target.workers)):
        per_round = ratios[r.target.key]
        ratio = per_round[r.round_no - 1] if r.target.workers == 2 and r.round_no <= len(per_round) else None
        lines.append(
            f"| {r.round_no} | {r.target.label} | {r.target.workers} | {fmt(r.rps, 0)} | {fmt(r.percentile(50))}"
            f" | {fmt(r.percentile(99))} | {fmt(r.server_cpu_ms_per_request, 3)}"
            f" | {fmt(100 * r.server_cpu_s / r.window_s, 0)} | {fmt(100 * r.loadgen_cpu_s / r.window_s, 0)}"
            f" | {fmt(100 * r.other_cpu_s / r.window_s, 0)} | {sum(r.errors.values())}"
            f" | {'' if ratio is None else fmt(ratio, 3)} |"
        )

    def median_of(key: str, workers: int, figure: str) -> float:
        return median([getattr(r, figure) for r in results if r.target.key == key and r.target.workers == workers])

    def spread(values: Sequence[float]) -> str:
        finite = [v for v in values if math.isfinite(v)]
        return f"{min(finite):.3f}-{max(finite):.3f}" if finite else "n/a"

    ratio, bare_ratio = median(ratios["pacemaker"]), median(ratios["bare"])
    rps = {(k, w): median_of(k, w, "rps") for k in ("pacemaker", "bare") for w in (1, 2)}
    cpu = {(k, w): median_of(k, w, "server_cpu_ms_per_request") for k in ("pacemaker", "bare") for w in (1, 2)}
    other = median([100 * r.other_cpu_s / r.window_s for r in results])
    nan = float("nan")
    lines += [
        "",
        "Server CPU % is of one core, summed over the server's processes (uvicorn's supervisor and its workers)."
        " Other CPU % is busy time of the machine outside this benchmark during the row (other benchmarks): rows"
        " with much of it are noise.",
        "",
        "| check | measured | target | verdict |",
        "|---|---:|---|---|",
        f"| CPU per request, 2 workers / 1 worker (median of the rounds' ratios; rounds {spread(ratios['pacemaker'])})"
        f" | {fmt(ratio, 3)} | <= {CPU_RATIO_TARGET:.2f} | {verdict(ratio <= CPU_RATIO_TARGET)} |",
        f"| the same for the bare proxy (rounds {spread(ratios['bare'])}) | {fmt(bare_ratio, 3)} | (info) | |",
        f"| Pacemaker's server CPU per request, 1 worker / 2 workers (medians) | {fmt(cpu['pacemaker', 1], 3)}"
        f" / {fmt(cpu['pacemaker', 2], 3)} ms | (info) | |",
        f"| Pacemaker's req/s, 1 worker / 2 workers (medians) | {fmt(rps['pacemaker', 1], 0)}"
        f" / {fmt(rps['pacemaker', 2], 0)} | (info) | |",
        f"| bare proxy's req/s, 1 worker / 2 workers (medians) | {fmt(rps['bare', 1], 0)}"
        f" / {fmt(rps['bare', 2], 0)} | (info) | |",
        f"| other CPU on the machine during the rows (median) | {fmt(other, 0)} % | (info) | |",
        f"| Pacemaker's idle CPU, 1 worker / 2 workers ({idle_s:g} s, nothing sent)"
        f" | {fmt(idle.get(('pacemaker', 1), nan))} / {fmt(idle.get(('pacemaker', 2), nan))} ms/s | (info) | |",
    ]
    failed = sum(sum(r.errors.values()) for r in results)
    if failed:
        lines += ["", f"**{failed} requests failed** (see stderr): the rows with errors are void."]
    return "\n".join(lines) + "\n", ratio


def problems(results: Sequence[Result], args: argparse.Namespace, ratio: float) -> list[str]:
    found = [p for r in results for p in r.problems(f"round {r.round_no}, {r.target.label}")]
    seen = {(r.round_no, r.target.key, r.target.workers) for r in results}
    found += [
        f"round {n}, {key}, {w} workers: no figures"
        for n in range(1, args.rounds + 1)
        for key in ("pacemaker", "bare")
        for w in (1, 2)
        if (n, key, w) not in seen
    ]
    if not math.isfinite(ratio):
        found.append("the CPU-per-request ratio could not be computed")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish first")
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
    ratio = float("nan")
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            redis = start_redis(workdir, children)
            targets: list[Target] = []
            for workers in (1, 2):
                server, key = start_pacemaker(workdir, workers, fake.port, redis.port, children)
                targets.append(Target("pacemaker", "Pacemaker", server, {"Authorization": f"Bearer {key}"}))
            for workers in (1, 2):
                targets.append(Target("bare", "bare proxy", start_bare(workdir, workers, fake.port, children), {}))
            for target in targets:
                runner.run(wait_for_workers(target))
            if not (args.smoke or args.no_wait):
                wait_for_quiet_machine()
            idle_s = 1.0 if args.smoke else IDLE_S
            log(f"idle CPU over {idle_s:g} s...")
            idle = idle_cpu(targets, idle_s)
            for round_no in range(1, args.rounds + 1):
                for key in ("pacemaker", "bare"):
                    pair = [t for t in targets if t.key == key]
                    for target in pair if round_no % 2 else reversed(pair):
                        log(f"round {round_no}/{args.rounds}  {target.label}, {target.workers} worker(s) ...")
                        result = runner.run(run_load(target, round_no, args.warmup, args.seconds, children))
                        results.append(result)
                        log(
                            f"{'':20} {result.rps:,.0f} req/s, p50 {result.percentile(50):.2f} ms,"
                            f" {result.server_cpu_ms_per_request:.3f} server CPU ms/req,"
                            f" other CPU {100 * result.other_cpu_s / result.window_s:.0f} %"
                        )
                        for error, count in result.errors.most_common(3):
                            log(f"{'':20} {count} x {error}")
            table, ratio = render(results, args, idle, idle_s)
            print(table)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(problems(results, args, ratio))


if __name__ == "__main__":
    sys.exit(main())
