"""Held streams: thousands of SSE streams open at once on one worker, against a bare proxy and the upstream.

    .venv/bin/python -m benchmarks.held [--counts 1000,5000,9000] [--rate 1000] [--profile 10] [--smoke]

Issue 13's targets 2 (the held-stream half) and 3. Every row opens `count` streams at `rate` new
connections per second and holds each to its end:

  1 event/s    the fake upstream's held-slow profile: the role chunk at once, the first token after
               1 s, 20 tokens 1 s apart (20 s a stream); at 1,000, 5,000 and 9,000 streams
  10 events/s  held-fast: the first token after 0.1 s, 50 tokens 0.1 s apart (5 s); 1,000 streams

on the fake upstream called directly, the bare proxy (benchmarks/bare_proxy.py: FastAPI on one
aiohttp session), Pacemaker's POST /v1/chat/completions and Pacemaker's POST /v1/tasks, each with
stream: true. Each row gets a freshly started server (so that its memory figures start from the same
idle process), warmed with a few streams first.

The load comes from --procs processes of benchmarks/held_client.py (raw asyncio + httptools), from
source addresses 127.0.0.2-5; every process here raises its soft RLIMIT_NOFILE to the hard limit.
Per row: the streams the upstream saw open at once (its own counter), errors by kind, time to
first byte and to the end, the server's RSS per held stream ((peak - idle) / streams held at once),
listen-queue overflows and drops (TcpExt ListenOverflows / ListenDrops in /proc/net/netstat: the
whole network namespace, so any listener's), and CPU by process.

With two or more CPUs the server under test is pinned to CPU 0 and everything else (load
generators, the fake upstream when it is not the one measured, this process) to CPU 1; --no-pin
turns that off. --profile N records Pacemaker with py-spy for the first N s of one more 9,000-stream
(or the largest count's) storm, not counted in the tables (--profile-pace fast: the largest 10 events/s
count's). --smoke: every row once with 200 streams at 400/s and two-second streams, unpinned.
Either way the exit status is 1 if a request failed, a row is missing or a figure could not be
computed. Markdown on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app.config import ServerSettings
from benchmarks import pyspy
from benchmarks.harness import (
    HOST,
    Child,
    can_pin,
    child_env,
    clean_up,
    exit_status,
    fmt,
    free_port,
    log,
    machine_busy,
    own_cpu,
    pacemaker_cli,
    percentile,
    pin_under_test,
    terminate_on_sigterm,
    verdict,
    wait_for_quiet_machine,
    write_config,
)
from benchmarks.held_client import raise_fd_limit

MODEL = "fake-model"
SOURCES = [f"127.0.0.{n}" for n in range(2, 6)]
BACKLOG = 4096  # asked of every server; the kernel caps it at net.core.somaxconn
POOL = 20_000  # upstream connections each proxy may open (its default, 4096, is fewer than the streams)
WARMUP_STREAMS = 20
SAMPLE_S = 0.1  # how often the server's RSS is read
RSS_RATIO_TARGET = 1.25
TTFB_RATIO_TARGET = 2.0


@dataclass(frozen=True)
class Profile:
    key: str
    label: str
    directives: str  # in the last user message: the fake upstream's pace
    stream_s: float  # how long one stream lasts at the upstream


PROFILES = {
    "slow": Profile("slow", "1 event/s", "#profile=held-slow", 20.0),
    "fast": Profile("fast", "10 events/s", "#profile=held-fast", 5.0),
}
SMOKE_PACE = " #first=0.5 #delay=0.5 #tokens=3"  # two-second streams (the profile's other directives overridden)


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    path: str


TARGETS = {
    "upstream": Target("upstream", "upstream (direct)", "/v1/chat/completions"),
    "bare": Target("bare", "bare proxy", "/v1/chat/completions"),
    "pacemaker": Target("pacemaker", "Pacemaker chat", "/v1/chat/completions"),
    "tasks": Target("tasks", "Pacemaker tasks", "/v1/tasks"),
}


@dataclass
class Row:
    profile: Profile
    count: int
    target: Target
    round_no: int = 1
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttfb_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    peak_upstream: int = 0  # streams open at once, as the upstream counted them
    peak_client: int = 0  # ... as the load generators did (the sum of each one's peak)
    idle_rss: int = 0
    peak_rss: int = 0
    window_s: float = float("nan")
    server_cpu_s: float = float("nan")
    upstream_cpu_s: float = float("nan")
    loadgen_cpu_s: float = 0.0
    other_cpu_s: float = float("nan")
    overflows: int = 0
    drops: int = 0
    max_late_s: float = 0.0  # the load generators' own lag behind their schedule

    @property
    def rss_per_stream_kb(self) -> float:
        if not self.peak_upstream:
            return float("nan")
        return max(0, self.peak_rss - self.idle_rss) / self.peak_upstream / 1024

    def p(self, values: list[float], q: float) -> float:
        return percentile(sorted(values), q)

    def pct(self, cpu_s: float) -> float:
        return 100 * cpu_s / self.window_s if self.window_s else float("nan")


# ---------------------------------------------------------------------------------------------
# Servers


class Servers:
    """The fake upstream (on one port for the whole run), and the server under test, started afresh per row."""

    def __init__(self, workdir: Path, children: list[Child]) -> None:
        self.workdir = workdir
        self.children = children
        self.upstream_port = free_port()
        self.upstream = self._start_upstream()
        self.pacemaker_env, self.key = self._prepare_pacemaker()
        self.server: Child | None = None

    def _start(self, name: str, args: list[str], env: dict[str, str], port: int) -> Child:
        child = Child(name, args, env, self.workdir / f"{name.replace(' ', '-')}.log", port)
        self.children.append(child)
        child.wait_for_port()
        return child

    def _start_upstream(self) -> Child:
        args = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(self.upstream_port)]
        return self._start("fake upstream", [*args, "--backlog", str(BACKLOG)], child_env(), self.upstream_port)

    def _prepare_pacemaker(self) -> tuple[dict[str, str], str]:
        server: dict[str, Any] = {"access_log": False, "drain_grace_s": 0}
        if "backlog" in ServerSettings.model_fields:
            server["backlog"] = BACKLOG
        if "edge" in ServerSettings.model_fields:
            # Every stream comes from 127.0.0.2-5: a per-address limit the load never reaches (on, as it is costed).
            server["edge"] = {"rate": "100000000/minute"}
        config: dict[str, Any] = {
            "database": {"url": f"sqlite+aiosqlite:///{self.workdir / 'pacemaker.db'}"},
            "auth": {"dev_key_file": str(self.workdir / "dev-key")},
            "server": server,
            "audit": {"spool_dir": str(self.workdir / "audit-spool")},
            "tasks": {"spool_dir": str(self.workdir / "task-spool")},
            # Enforcement stays on (its cost is part of what is measured) with limits the load never reaches;
            # global_max_in_flight (default 2,000) bounds the streams one instance holds.
            "limits": {
                "rpm": 1_000_000_000,
                "tpm": 1_000_000_000_000,
                "max_concurrency": 100_000,
                "global_max_in_flight": 100_000,
            },
            "providers": {
                "simulated": {"kind": "simulated", "tokens_per_second": 0},
                "fake": {
                    "kind": "openai",
                    "base_url": f"http://{HOST}:{self.upstream_port}/v1",
                    "api_key": "sk-bench",
                    "max_connections": POOL,
                },
            },
            "models": {
                **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
                MODEL: {"provider": "fake", "input_usd_per_mtok": "1.0", "output_usd_per_mtok": "2.0"},
            },
        }
        env = write_config(self.workdir / "pacemaker.yaml", config)
        pacemaker_cli(env, "migrate")
        limits = ["--rpm", "1000000000", "--tpm", "2000000000", "--max-concurrency", "100000"]
        created = pacemaker_cli(env, "keys", "create", "--name", "held-bench", "--json", *limits)
        return env, str(json.loads(created)["key"])

    def start(self, target: Target) -> Child:
        """The server `target` is measured on, freshly started (the upstream itself for `upstream`)."""
        self.stop_server()
        if target.key == "upstream":
            self.upstream.stop()
            self.children.remove(self.upstream)
            self.upstream = self._start_upstream()
            return self.upstream
        port = free_port()
        if target.key == "bare":
            upstream = f"http://{HOST}:{self.upstream_port}/v1"
            args = [sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(port), "--upstream", upstream]
            args += ["--max-connections", str(POOL), "--backlog", str(BACKLOG)]
            self.server = self._start("bare proxy", args, child_env(), port)
        else:
            args = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
            self.server = self._start("pacemaker", args, self.pacemaker_env, port)
        return self.server

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.children.remove(self.server)
            self.server = None

    def _control(self, method: str, path: str) -> dict[str, Any]:
        connection = http.client.HTTPConnection(HOST, self.upstream_port, timeout=30)
        try:
            connection.request(method, path)
            answer: dict[str, Any] = json.loads(connection.getresponse().read())
            return answer
        finally:
            connection.close()

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "/_control/stats")

    def reset_upstream(self) -> None:
        self._control("POST", "/_control/reset")


# ---------------------------------------------------------------------------------------------
# Load


def body_for(target: Target, directives: str) -> str:
    if target.key == "tasks":
        return json.dumps({"query": f"Hold this stream. {directives}", "model": MODEL, "tools": [], "stream": True})
    messages = [{"role": "user", "content": f"Hold this stream. {directives}"}]
    return json.dumps({"model": MODEL, "messages": messages, "stream": True})


def run_clients(
    server: Child, target: Target, headers: dict[str, str], directives: str, count: int, rate: float, procs: int,
    timeout_s: float, workdir: Path, on_tick: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """`count` streams from `procs` load generator processes; their results (on_tick() while they run)."""
    spec = {
        "host": HOST,
        "port": server.port,
        "path": target.path,
        "headers": headers,
        "body": body_for(target, directives),
        "expect": "event: task.completed" if target.key == "tasks" else "data: [DONE]",
        "sources": SOURCES,
        "count": count,
        "rate": rate,
        "procs": procs,
        "timeout_s": timeout_s,
        "start_at": time.time() + 0.5,  # every process starts its schedule at the same instant
    }
    running: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for offset in range(procs):
            out = workdir / f"client-{offset}.json"
            with out.open("wb") as stdout:
                client = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.held_client"],
                    stdin=subprocess.PIPE,
                    stdout=stdout,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            assert client.stdin is not None
            client.stdin.write(json.dumps({**spec, "offset": offset}).encode())
            client.stdin.close()
            running.append((client, out))
        deadline = time.monotonic() + count / rate + timeout_s + 60
        while any(c.poll() is None for c, _ in running):
            if time.monotonic() > deadline:
                raise RuntimeError("a load generator did not finish in time")
            if on_tick is not None:
                on_tick()
            time.sleep(SAMPLE_S)
        results = []
        for client, out in running:
            assert client.stderr is not None
            if client.returncode != 0:
                raise RuntimeError(f"a load generator exited {client.returncode}: {client.stderr.read().decode()}")
            results.append(json.loads(out.read_text()))
        return results
    finally:
        for client, _ in running:
            if client.poll() is None:
                client.kill()
                client.wait(10)
            if client.stderr is not None:
                client.stderr.close()


def listen_counters() -> tuple[int, int]:
    """(ListenOverflows, ListenDrops) of TcpExt so far, from /proc/net/netstat."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return row.get("ListenOverflows", 0), row.get("ListenDrops", 0)
    return 0, 0


def measure(
    servers: Servers, target: Target, profile: Profile, count: int, args: argparse.Namespace, pinning: bool
) -> Row:
    server = servers.start(target)
    headers = {"Authorization": f"Bearer {servers.key}"} if target.key in ("pacemaker", "tasks") else {}
    pace = profile.directives + (SMOKE_PACE if args.smoke else "")
    stream_s = 2.0 if args.smoke else profile.stream_s
    if pinning:
        pin_under_test(server, servers.children)
    # A few streams first, so that what every first request sets up is in the idle figure.
    warm = run_clients(server, target, headers, pace + SMOKE_PACE, WARMUP_STREAMS, 100, 1, 30, servers.workdir)
    if sum(r["ok"] for r in warm) != WARMUP_STREAMS:
        errors = Counter[str]()
        for r in warm:
            errors.update(r["errors"])
        raise RuntimeError(f"{target.label}: warm-up streams failed: {dict(errors)}\n{server.output()}")
    time.sleep(1.0)
    servers.reset_upstream()
    row = Row(profile, count, target)
    process = psutil.Process(server.popen.pid)
    row.idle_rss = row.peak_rss = process.memory_info().rss

    def sample() -> None:
        with contextlib.suppress(psutil.Error):
            row.peak_rss = max(row.peak_rss, process.memory_info().rss)

    others = [c for c in servers.children if c is not server]
    before = (time.perf_counter(), server.cpu_seconds(), servers.upstream.cpu_seconds(), machine_busy(), own_cpu())
    other_before = sum(c.cpu_seconds() for c in others)
    overflows, drops = listen_counters()
    results = run_clients(
        server, target, headers, pace, count, args.rate, args.procs, stream_s + 90, servers.workdir, sample
    )
    after_overflows, after_drops = listen_counters()
    after = (time.perf_counter(), server.cpu_seconds(), servers.upstream.cpu_seconds(), machine_busy(), own_cpu())
    other_after = sum(c.cpu_seconds() for c in others)
    row.overflows, row.drops = after_overflows - overflows, after_drops - drops
    row.window_s = after[0] - before[0]
    row.server_cpu_s = after[1] - before[1]
    row.upstream_cpu_s = after[2] - before[2] if target.key != "upstream" else 0.0
    for result in results:
        row.ok += result["ok"]
        row.errors.update(result["errors"])
        row.ttfb_s += result["ttfb_s"]
        row.total_s += result["total_s"]
        row.peak_client += result["peak_open"]
        row.loadgen_cpu_s += result["cpu_s"]
        row.max_late_s = max(row.max_late_s, result["max_late_s"])
    ours = row.server_cpu_s + (other_after - other_before) + row.loadgen_cpu_s + (after[4] - before[4])
    row.other_cpu_s = max(0.0, (after[3] - before[3]) - ours)
    row.peak_upstream = int(servers.stats()["peak_active"])
    return row


# ---------------------------------------------------------------------------------------------
# Report


def render(rows: Sequence[Row], args: argparse.Namespace, pinning: bool) -> str:
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lines = [
        "### Held streams: fake upstream, bare aiohttp proxy, Pacemaker",
        "",
        f"{platform.python_implementation()} {platform.python_version()}, {psutil.cpu_count()} CPUs shared by the"
        " server, the load generators and the upstream"
        f" ({'server under test pinned to CPU 0, everything else to CPU 1' if pinning else 'not pinned'});"
        f" one worker per server; streams opened at {args.rate:,.0f}/s from {args.procs} load generator processes;"
        f" listen backlog {BACKLOG} asked, net.core.somaxconn {somaxconn}; RLIMIT_NOFILE {soft}/{hard}.",
        "",
        "| pace | streams | target | held at once (upstream) | errors | p50 / p99 first byte s | p99 end s"
        " | idle RSS MB | RSS per stream KB | listen overflows / drops | server CPU % | loadgen CPU % | upstream CPU %"
        " | other CPU % |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        errors = ", ".join(f"{n:,} {kind}" for kind, n in r.errors.most_common()) or "0"
        lines.append(
            f"| {r.profile.label} | {r.count:,} | {r.target.label} | {r.peak_upstream:,} | {errors}"
            f" | {fmt(r.p(r.ttfb_s, 50))} / {fmt(r.p(r.ttfb_s, 99))} | {fmt(r.p(r.total_s, 99), 1)}"
            f" | {fmt(r.idle_rss / 2**20, 0)} | {fmt(r.rss_per_stream_kb, 1)} | {r.overflows:,} / {r.drops:,}"
            f" | {fmt(r.pct(r.server_cpu_s), 0)} | {fmt(r.pct(r.loadgen_cpu_s), 0)}"
            f" | {fmt(r.pct(r.upstream_cpu_s), 0)} | {fmt(r.pct(r.other_cpu_s), 0)} |"
        )
    lines += [
        "",
        "Held at once: the most streams the upstream had open together (for the upstream row, its own count)."
        " RSS per stream: the server's peak RSS during the row minus its idle RSS before it, over the streams held"
        " at once. Listen overflows and drops count every listener on the machine (the upstream's too) over the"
        " row. CPU % is of one core, over the whole row.",
        "",
    ]
    lines += ["| check | measured | target | verdict |", "|---|---:|---|---|"]
    lines += [f"| {name} | {value} | {target} | {outcome} |" for name, value, target, outcome in checks(rows)]
    return "\n".join(lines) + "\n"


def _find(rows: Sequence[Row], profile: str, count: int, target: str) -> Row | None:
    # The last round's row, when there are several (each round's checks are printed with its own table).
    found = [r for r in rows if r.profile.key == profile and r.count == count and r.target.key == target]
    return found[-1] if found else None


def checks(rows: Sequence[Row]) -> list[tuple[str, str, str, str]]:
    found: list[tuple[str, str, str, str]] = []
    slow_counts = sorted({r.count for r in rows if r.profile.key == "slow"})
    for target in ("pacemaker", "tasks"):
        for count in slow_counts:
            r, bare = _find(rows, "slow", count, target), _find(rows, "slow", count, "bare")
            if r is None:
                continue
            name = f"{r.target.label}, {count:,} held at 1 event/s"
            failed = sum(r.errors.values())
            found.append((f"{name}: errors", f"{failed:,}", "0", verdict(failed == 0)))
            found.append(
                (f"{name}: held at once", f"{r.peak_upstream:,}", f"{count:,}", verdict(r.peak_upstream >= count))
            )
            found.append((f"{name}: listen overflows", f"{r.overflows:,}", "0", verdict(r.overflows == 0)))
            if bare is not None:
                ratio = r.rss_per_stream_kb / bare.rss_per_stream_kb if bare.rss_per_stream_kb else float("nan")
                measured = f"{fmt(ratio)}x ({fmt(r.rss_per_stream_kb, 1)} / {fmt(bare.rss_per_stream_kb, 1)} KB)"
                found.append((f"{name}: RSS per stream / bare", measured, f"<= {RSS_RATIO_TARGET}x",
                              verdict(ratio <= RSS_RATIO_TARGET)))  # fmt: skip
    fast_counts = sorted({r.count for r in rows if r.profile.key == "fast"})
    for target in ("pacemaker", "tasks"):
        for count in fast_counts:
            r, bare = _find(rows, "fast", count, target), _find(rows, "fast", count, "bare")
            if r is None or bare is None:
                continue
            mine, theirs = r.p(r.ttfb_s, 99), bare.p(bare.ttfb_s, 99)
            ratio = mine / theirs if theirs else float("nan")
            name = f"{r.target.label}, {count:,} held at 10 events/s: p99 first byte / bare"
            measured = f"{fmt(ratio)}x ({fmt(mine)} / {fmt(theirs)} s)"
            found.append((name, measured, f"<= {TTFB_RATIO_TARGET}x", verdict(ratio <= TTFB_RATIO_TARGET)))
    return found


def problems(rows: Sequence[Row], expected: Sequence[tuple[int, str, int, str]]) -> list[str]:
    found = []
    for r in rows:
        label = f"round {r.round_no}, {r.profile.label}, {r.count} streams, {r.target.label}"
        if r.errors:
            found.append(f"{label}: {sum(r.errors.values())} streams failed: {dict(r.errors)}")
        figures = {
            "p99 first byte": r.p(r.ttfb_s, 99),
            "RSS per stream": r.rss_per_stream_kb,
            "server CPU": r.server_cpu_s,
            "other CPU": r.other_cpu_s,
        }
        found += [f"{label}: {name} could not be computed" for name, v in figures.items() if not math.isfinite(v)]
    seen = {(r.round_no, r.profile.key, r.count, r.target.key) for r in rows}
    found += [f"round {n}, {p}, {c} streams, {t}: no figures" for n, p, c, t in expected if (n, p, c, t) not in seen]
    found += [f"check not computed: {name}" for name, value, _, _ in checks(rows) if "n/a" in value]
    return found


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,5000,9000", help="streams per 1 event/s row (comma-separated)")
    parser.add_argument("--fast-counts", default="1000", help="streams per 10 events/s row (comma-separated)")
    parser.add_argument("--rate", type=float, default=1000.0, help="new connections per second (default 1000)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every row (default 1)")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS", help="py-spy Pacemaker's storm")
    parser.add_argument("--profile-target", default="pacemaker", choices=["pacemaker", "tasks"])
    parser.add_argument(
        "--profile-pace", default="slow", choices=list(PROFILES), help="the storm profiled: slow (1 event/s) or fast"
    )
    parser.add_argument("--profile-out", type=Path, help="where to keep py-spy's raw stacks (default: a temp file)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, small, unpinned")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish first")
    args = parser.parse_args(argv)
    if args.smoke:
        args.counts, args.fast_counts, args.rate, args.rounds, args.no_pin = "200", "200", 400.0, 1, True
    args.counts = [int(c) for c in args.counts.split(",") if c]
    args.fast_counts = [int(c) for c in args.fast_counts.split(",") if c]
    args.targets = [t for t in args.targets.split(",") if t]
    if unknown := [t for t in args.targets if t not in TARGETS]:
        parser.error(f"unknown target: {', '.join(unknown)}")
    if not (1 <= args.rounds <= 10 and 1 <= args.procs <= 16 and 1 <= args.rate <= 100_000 and args.profile >= 0):
        parser.error("--rounds must be in [1, 10], --procs in [1, 16], --rate in [1, 100000]")
    if args.profile > 0 and not (args.counts if args.profile_pace == "slow" else args.fast_counts):
        parser.error(f"--profile-pace {args.profile_pace} profiles a storm of that pace's largest count: give one")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = raise_fd_limit()  # the servers started from here inherit it
    log(f"RLIMIT_NOFILE {soft}/{hard}")
    pinning = can_pin(args.no_pin)
    if not (args.smoke or args.no_wait):
        wait_for_quiet_machine()
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-held-"))
    children: list[Child] = []
    rows: list[Row] = []
    expected = [
        (n, p, c, t)
        for n in range(1, args.rounds + 1)
        for p, counts in (("slow", args.counts), ("fast", args.fast_counts))
        for c in counts
        for t in args.targets
    ]
    try:
        with terminate_on_sigterm():
            log(f"starting servers in {workdir}")
            servers = Servers(workdir, children)
            for round_no, profile_key, count, target_key in expected:
                target, profile = TARGETS[target_key], PROFILES[profile_key]
                log(f"round {round_no}/{args.rounds}  {profile.label:11} {count:>6,} streams  {target.label} ...")
                row = measure(servers, target, profile, count, args, pinning)
                row.round_no = round_no
                rows.append(row)
                log(
                    f"{'':24} held {row.peak_upstream:,}, ok {row.ok:,}, errors {dict(row.errors)},"
                    f" p99 first byte {fmt(row.p(row.ttfb_s, 99))} s, {fmt(row.rss_per_stream_kb, 1)} KB/stream,"
                    f" overflows {row.overflows}, server CPU {fmt(row.pct(row.server_cpu_s), 0)} %,"
                    f" loadgen late {row.max_late_s:.2f} s"
                )
            servers.stop_server()
            print(render(rows, args, pinning))
            if args.json:
                args.json.write_text(json.dumps([_as_dict(r) for r in rows], indent=2) + "\n")
            if args.profile > 0:
                profile_storm(servers, args, pinning)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(problems(rows, expected))


def profile_storm(servers: Servers, args: argparse.Namespace, pinning: bool) -> None:
    """py-spy on Pacemaker for the first --profile seconds of a storm of the largest count's streams."""
    target, pace_profile = TARGETS[args.profile_target], PROFILES[args.profile_pace]
    count = max(args.counts if pace_profile.key == "slow" else args.fast_counts)
    out = args.profile_out or servers.workdir / "pacemaker.pyspy.txt"
    server = servers.start(target)
    if pinning:
        pin_under_test(server, servers.children)
    headers = {"Authorization": f"Bearer {servers.key}"}
    pace = pace_profile.directives + (SMOKE_PACE if args.smoke else "")
    log(f"profiling {target.label} for {args.profile:g} s of a {count:,}-stream storm -> {out}")

    def load(_duration: int) -> None:
        run_clients(server, target, headers, pace, count, args.rate, args.procs, 120, servers.workdir)

    pyspy.record(server.popen.pid, args.profile, out, load, pinning)
    servers.stop_server()
    print(f"#### Where Pacemaker's CPU goes ({target.label}, {count:,} streams at {pace_profile.label} opened at"
          f" {args.rate:,.0f}/s; py-spy, the first {args.profile:g} s)\n")  # fmt: skip
    print(pyspy.summarise(out))


def _as_dict(r: Row) -> dict[str, Any]:
    return {
        "round": r.round_no,
        "profile": r.profile.key,
        "count": r.count,
        "target": r.target.key,
        "ok": r.ok,
        "errors": dict(r.errors),
        "held_at_once": r.peak_upstream,
        "held_at_once_client": r.peak_client,
        "ttfb_p50_s": r.p(r.ttfb_s, 50),
        "ttfb_p99_s": r.p(r.ttfb_s, 99),
        "total_p99_s": r.p(r.total_s, 99),
        "idle_rss": r.idle_rss,
        "peak_rss": r.peak_rss,
        "rss_per_stream_kb": r.rss_per_stream_kb,
        "listen_overflows": r.overflows,
        "listen_drops": r.drops,
        "window_s": r.window_s,
        "server_cpu_s": r.server_cpu_s,
        "upstream_cpu_s": r.upstream_cpu_s,
        "loadgen_cpu_s": r.loadgen_cpu_s,
        "other_cpu_s": r.other_cpu_s,
        "max_late_s": r.max_late_s,
    }


if __name__ == "__main__":
    sys.exit(main())
