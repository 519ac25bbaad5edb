"""Benchmark POST /v1/chat/completions: the fake upstream alone, a bare aiohttp proxy, and Pacemaker.

    .venv/bin/python -m benchmarks.chat_proxy [--seconds 5] [--warmup 1] [--profile 10]

Starts three servers on 127.0.0.1, one uvicorn (or aiohttp) worker each:

  upstream    the fake OpenAI upstream (tests/fakes/upstream.py), called directly
  bare proxy  benchmarks/bare_proxy.py: FastAPI + one shared aiohttp session, the Python ceiling
  Pacemaker   `pacemaker serve`, SQLite in a temporary directory, one model on the fake upstream

and drives each with a load generator in this process (asyncio + aiohttp, uvloop) for a fixed time
per scenario after a warm-up: JSON at concurrency 1 and 64, SSE (with the usage chunk) at 64. The
scenarios run one target after another, so that each ratio compares runs close in time.

With two or more CPUs the process under test is pinned to CPU 0 and everything else (the load
generator, and the fake upstream when it is not the one measured) to CPU 1, so the figures say what
one core of server buys; --no-pin turns that off. Server CPU is the server process's user+system
time over the measured window (psutil), divided by the requests completed in it.

--profile N adds, after the measurements, an N-second py-spy recording (--gil: Python CPU time) of
Pacemaker under the JSON c=64 load, or --profile-scenario's, not counted in the table, and prints
where its CPU goes. py-spy is not a project dependency: `.venv/bin/pip install py-spy` first.

Everything printed on stdout is markdown, ready for the README; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import yaml

from benchmarks.harness import (
    HOST,
    Child,
    child_env,
    clean_up,
    free_port,
    log,
    pacemaker_cli,
    pin,
    terminate_on_sigterm,
)

PATH = "/v1/chat/completions"
MODEL = "fake-model"
REQUEST_TIMEOUT_S = 30.0  # no single request may hang a scenario longer than this
SERVER_CPU = 0  # when pinning: the process under test
LOAD_CPU = 1  # when pinning: the load generator, py-spy and the idle servers

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name twelve Greek letters, please."},
]
TARGET_CHECKS = {"pacemaker_vs_bare_rps_c64": 0.6, "pacemaker_added_p50_ms_c1": 2.0}


# ---------------------------------------------------------------------------------------------
# Child processes


def start_fake_upstream(workdir: Path, children: list[Child]) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port)]
    children.append(child := Child("fake upstream", args, child_env(), workdir / "fake-upstream.log", port))
    child.wait_for_port()
    return child


def start_bare_proxy(workdir: Path, upstream_port: int, children: list[Child]) -> Child:
    port = free_port()
    upstream = f"http://{HOST}:{upstream_port}/v1"
    args = [sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(port), "--upstream", upstream]
    children.append(child := Child("bare proxy", args, child_env(), workdir / "bare-proxy.log", port))
    child.wait_for_port()
    return child


def start_pacemaker(workdir: Path, upstream_port: int, children: list[Child]) -> tuple[Child, str]:
    """Pacemaker as `make run` would serve it, on a fresh SQLite database; returns it and an API key."""
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        "server": {"access_log": False},
        # Enforcement stays on (its cost is part of what is measured) with limits the load never reaches.
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
    config_path = workdir / "pacemaker.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = child_env(PACEMAKER_CONFIG=str(config_path))

    def cli(*args: str) -> str:
        return pacemaker_cli(env, *args)

    cli("migrate")
    key: str = json.loads(cli("keys", "create", "--name", "bench", "--json"))["key"]
    port = free_port()
    args = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    children.append(child := Child("pacemaker", args, env, workdir / "pacemaker.log", port))
    child.wait_for_port()
    return child, key


def pin_for(target: Target, children: Sequence[Child]) -> None:
    """The process under test on its own CPU; the other servers and this load generator on the other."""
    for child in children:
        pin(child.popen.pid, {SERVER_CPU} if child is target.server else {LOAD_CPU})
    pin(os.getpid(), {LOAD_CPU})


# ---------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    url: str
    headers: dict[str, str]
    server: Child  # whose CPU is charged to the requests


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    concurrency: int
    stream: bool

    def body(self) -> bytes:
        payload: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}
        if self.stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        return orjson.dumps(payload)

    def valid(self, status: int, body: bytes) -> bool:
        if status != 200:
            return False
        if self.stream:
            return body.endswith(b"data: [DONE]\n\n") and b'"usage"' in body
        return b'"choices"' in body and b"alpha" in body


@dataclass
class Result:
    target: Target
    scenario: Scenario
    window_s: float
    latencies_ms: list[float]
    errors: Counter[str]
    server_cpu_s: float
    loadgen_cpu_s: float
    other_cpu_s: float  # busy CPU of processes outside the benchmark
    round_no: int = 1

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.requests / self.window_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]  # nearest rank

    @property
    def server_cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1000 / self.requests if self.requests else float("nan")


@dataclass(frozen=True)
class _Snapshot:
    at: float
    server: float  # CPU seconds so far: the process under test,
    loadgen: float  # this process,
    ours: float  # every process of the benchmark,
    machine: float  # and the whole machine (busy time of all CPUs)

    @classmethod
    def take(cls, server: Child, children: Sequence[Child]) -> _Snapshot:
        mine = psutil.Process().cpu_times()
        cpu = psutil.cpu_times()
        loadgen = mine.user + mine.system
        machine = cpu.user + cpu.nice + cpu.system + getattr(cpu, "irq", 0) + getattr(cpu, "softirq", 0)
        machine += getattr(cpu, "steal", 0)
        ours = loadgen + sum(c.cpu_seconds() for c in children if c.popen.poll() is None)
        return cls(time.perf_counter(), server.cpu_seconds(), loadgen, ours, machine)


async def run_load(
    target: Target, scenario: Scenario, warmup_s: float, seconds: float, children: Sequence[Child]
) -> Result:
    """Closed-loop load: `concurrency` workers send back to back for warm-up + seconds.

    Requests that complete inside the measured window count; CPU times (the server's, our own, and
    the machine's, to see other work that disturbed the row) are taken at the window's two ends.
    """
    body = scenario.body()
    headers = {"Content-Type": "application/json", **target.headers}
    begin = time.perf_counter()  # not loop.time(): uvloop's clock has millisecond steps
    window_start, window_end = begin + warmup_s, begin + warmup_s + seconds
    finished: list[tuple[float, float]] = []  # (completed at, latency ms)
    errors: Counter[str] = Counter()
    snapshots: list[_Snapshot] = []

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        snapshots.append(_Snapshot.take(target.server, children))
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        snapshots.append(_Snapshot.take(target.server, children))

    connector = aiohttp.TCPConnector(limit=scenario.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=["User-Agent"]) as http:

        async def worker() -> None:
            while (started := time.perf_counter()) < window_end:
                try:
                    async with http.post(target.url, data=body, headers=headers) as response:
                        content = await response.read()
                        ok = scenario.valid(response.status, content)
                        if not ok:
                            errors[f"HTTP {response.status}: {content[:160]!r}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                    ok = False
                    await asyncio.sleep(0.01)  # a refused connection must not spin
                if ok:
                    done = time.perf_counter()
                    finished.append((done, (done - started) * 1000))

        await asyncio.gather(sampler(), *(worker() for _ in range(scenario.concurrency)))

    first, last = snapshots
    return Result(
        target=target,
        scenario=scenario,
        window_s=last.at - first.at,
        latencies_ms=[ms for done, ms in finished if first.at <= done <= last.at],
        errors=errors,
        server_cpu_s=last.server - first.server,
        loadgen_cpu_s=last.loadgen - first.loadgen,
        other_cpu_s=max(0.0, (last.machine - first.machine) - (last.ours - first.ours)),
    )


async def smoke(target: Target, scenario: Scenario) -> None:
    """One request per scenario before any load: a broken setup fails here, with the server's log."""
    headers = {"Content-Type": "application/json", **target.headers}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(target.url, data=scenario.body(), headers=headers) as response,
    ):
        content = await response.read()
        if not scenario.valid(response.status, content):
            raise RuntimeError(
                f"{target.label}, {scenario.label}: HTTP {response.status} {content[:300]!r}\n"
                f"{target.server.name} log:\n{target.server.output()}"
            )


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ---------------------------------------------------------------------------------------------
# Profile


def profile_pacemaker(
    runner: asyncio.Runner,
    target: Target,
    scenario: Scenario,
    seconds: float,
    out: Path,
    children: Sequence[Child],
    pinning: bool,
) -> Path:
    """Record Pacemaker with py-spy (raw collapsed stacks) while the scenario's load runs."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy (it is not a project dependency)")
    duration = max(1, round(seconds))
    options = f"record --pid {target.server.popen.pid} --duration {duration} --rate 200 --format raw --gil"
    args = [py_spy, *options.split(), "--output", str(out)]
    with (out.parent / "py-spy.log").open("wb") as spy_log:
        spy = subprocess.Popen(args, stdout=spy_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if pinning:
                pin(spy.pid, {LOAD_CPU})
            # Load from before py-spy attaches until after it stops.
            runner.run(run_load(target, scenario, 1.0, duration + 1.5, children))
            spy.wait(timeout=duration + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(10)
    if spy.returncode != 0 or not out.is_file():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {(out.parent / 'py-spy.log').read_text()[-2000:]}")
    return out


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> tuple[str, str]:
    """('function', 'module') from py-spy's 'function (path/file.py:line)'."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?"
    return match["func"], _module(match["file"])


def _module(path: str) -> str:
    """A frame's module as py-spy names its file: 'app.providers.openai', 'fastapi', 'asyncio', 'threading'."""
    if path.startswith("<frozen"):
        return "stdlib"
    parts = list(Path(path).with_suffix("").parts)
    for i in range(len(parts) - 1, -1, -1):  # absolute paths: keep what follows site-packages or lib/pythonX.Y
        if parts[i] == "site-packages" or re.fullmatch(r"python3\.\d+", parts[i]):
            parts = parts[i + 1 :]
            break
    else:
        if "app" in parts:  # the project, from the work tree
            parts = parts[parts.index("app") :]
    if not parts:
        return "?"
    return ".".join(parts) if parts[0] == "app" else parts[0]


_NO_FRAME = "(no Python frame) (?)"
_ROOTS = ("_run_module_as_main (", "Thread._bootstrap (", _NO_FRAME)


def _stitch(stacks: list[tuple[list[str], int]]) -> tuple[list[tuple[list[str], int]], int]:
    """Complete the stacks py-spy cut short, from whole stacks that pass through their first frame.

    Under asyncio, py-spy often loses a stack's outer frames; the call site (function, file and line)
    where one starts nearly always has a single ancestry in a one-route benchmark, so the most common
    one is prepended. Returns the stacks and how many samples were whole to begin with.
    """
    prefixes: dict[str, Counter[tuple[str, ...]]] = {}
    complete = 0
    for frames, count in stacks:
        if frames[0].startswith(_ROOTS):
            complete += count
            for i, frame in enumerate(frames[1:], 1):
                for key in (frame, _LINE.sub(")", frame)):  # the exact call site, else the function
                    prefixes.setdefault(key, Counter())[tuple(frames[:i])] += count
    stitched = []
    for frames, count in stacks:
        for _ in range(8):  # each step reaches a root or stops; bounded regardless
            if frames[0].startswith(_ROOTS):
                break
            found = prefixes.get(frames[0]) or prefixes.get(_LINE.sub(")", frames[0]))
            if found is None:
                break
            frames = [*found.most_common(1)[0][0], *frames]
        stitched.append((frames, count))
    return stitched, complete


_LINE = re.compile(r":\d+\)$")
_LAYERS = {
    "solve_dependencies", "run_endpoint_function", "run_in_threadpool", "Request.body", "Request.json",
    "serialize_response", "ClientSession._request", "ClientResponse.read", "ClientResponse.start",
    "Response.__call__", "Response.__init__", "request_body_to_args", "Router.__call__",
    "PrometheusInstrumentatorMiddleware._get_handler",
}  # fmt: skip


def _is_layer(func: str, module: str) -> bool:
    """Frames worth an inclusive figure: Pacemaker's own code, every middleware, and framework hot spots."""
    if module.startswith("app.") and module != "app.cli":
        return True
    return func.endswith("Middleware.__call__") or func in _LAYERS


def summarise_profile(raw: Path, top: int = 10) -> str:
    """Self time by function and by module, and inclusive time, as markdown tables."""
    raw_stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if samples.isdigit():
            raw_stacks.append(([f for f in stack.split(";") if f] or [_NO_FRAME], int(samples)))
    stitched, complete = _stitch(raw_stacks)
    stacks = [([_frame_name(f) for f in frames], count) for frames, count in stitched]
    total = sum(count for _, count in stacks)
    if not total:
        return "py-spy recorded no samples.\n"
    self_fn: Counter[tuple[str, str]] = Counter()
    self_mod: Counter[str] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    own: Counter[tuple[str, str]] = Counter()
    for frames, count in stacks:
        layer = next((f for f in reversed(frames) if _is_layer(*f)), ("(outside any layer: server, event loop)", "-"))
        own[layer] += count
        self_fn[frames[-1]] += count
        self_mod[frames[-1][1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}"

    partial = sum(count for frames, count in stitched if not frames[0].startswith(_ROOTS))
    threads = sum(count for frames, count in stacks if any(f[0] == "Thread._bootstrap" for f in frames))
    lines = [
        f"py-spy --gil: {total} samples taken while Pacemaker held the GIL (its Python CPU time); {pct(threads)} %"
        " of them in threads other than the event loop's (e.g. the thread pool that runs sync dependencies)."
        + (
            f" py-spy cut {pct(total - complete)} % of the stacks short; those were completed from whole stacks"
            f" through the same call site ({pct(partial)} % could not be), so inclusive figures are estimates."
            if complete < total
            else ""
        ),
        "",
    ]
    lines += ["| # | self % | function | module |", "|---:|---:|---|---|"]
    for i, ((func, module), n) in enumerate(self_fn.most_common(top), 1):
        lines.append(f"| {i} | {pct(n)} | `{func}` | {module} |")
    lines += ["", "| self % by module | module |", "|---:|---|"]
    lines += [f"| {pct(n)} | {module} |" for module, n in self_mod.most_common(top + 5)]
    lines += ["", "| own % | layer (each sample charged to the innermost layer on its stack) | module |"]
    lines += ["|---:|---|---|"]
    lines += [f"| {pct(n)} | `{func}` | {module} |" for (func, module), n in own.most_common(top * 2)]
    lines += ["", "| inclusive % | function (Pacemaker's code, middleware, framework hot spots) | module |"]
    lines += ["|---:|---|---|"]
    shown = [(f, n) for f, n in inclusive.most_common() if _is_layer(*f) and n >= 0.01 * total][: top * 3]
    lines += [f"| {pct(n)} | `{func}` | {module} |" for (func, module), n in shown]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def medians(results: Sequence[Result]) -> dict[tuple[str, str], tuple[Result, list[float]]]:
    """Per (target, scenario): the round with the median req/s, and every round's req/s."""
    rounds: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        rounds.setdefault((r.target.key, r.scenario.key), []).append(r)
    chosen = {}
    for key, runs in rounds.items():
        ordered = sorted(runs, key=lambda r: r.rps)
        chosen[key] = (ordered[(len(ordered) - 1) // 2], [r.rps for r in runs])
    return chosen


def render(results: Sequence[Result], args: argparse.Namespace, pinning: bool) -> str:
    rows = medians(results)
    rounds = f"median of {args.rounds} rounds by req/s" if args.rounds > 1 else "one round"
    lines = [
        "### POST /v1/chat/completions: fake upstream, bare aiohttp proxy, Pacemaker",
        "",
        f"{platform.python_implementation()} {platform.python_version()}, {psutil.cpu_count()} CPUs"
        f" ({'server under test pinned to CPU 0, load generator and the rest to CPU 1' if pinning else 'not pinned'}),"
        f" one worker per server, {args.warmup:g} s warm-up + {args.seconds:g} s measured per row, {rounds};"
        " 12-token answers; closed-loop load generator: asyncio + aiohttp on uvloop.",
        "",
        "| scenario | target | req/s | req/s, all rounds | p50 ms | p99 ms | server CPU ms/req | server CPU % |"
        " loadgen CPU % | other CPU % | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (_target, _scenario), (r, all_rps) in rows.items():
        errors = sum(sum(x.errors.values()) for x in results if x.target is r.target and x.scenario is r.scenario)
        lines.append(
            f"| {r.scenario.label} | {r.target.label} | {fmt(r.rps, 0)} | {' / '.join(fmt(x, 0) for x in all_rps)}"
            f" | {fmt(r.percentile(50))} | {fmt(r.percentile(99))} | {fmt(r.server_cpu_ms_per_request, 3)}"
            f" | {fmt(100 * r.server_cpu_s / r.window_s, 0)} | {fmt(100 * r.loadgen_cpu_s / r.window_s, 0)}"
            f" | {fmt(100 * r.other_cpu_s / r.window_s, 0)} | {errors} |"
        )
    lines += [
        "",
        "CPU % is of one core. Server CPU near 100 % means the worker is saturated; where the load generator is"
        " near 100 % instead, the row measures the client, not the server (the upstream called directly)."
        " Other CPU % is work on the machine outside this benchmark during the row: rows with much of it are noise.",
        "",
    ]

    def get(target: str, scenario: str) -> Result | None:
        found = rows.get((target, scenario))
        return found[0] if found else None

    checks: list[tuple[str, str, str, str]] = []
    pm, bare = get("pacemaker", "json_c64"), get("bare", "json_c64")
    if pm and bare:
        ratio = pm.rps / bare.rps if bare.rps else float("nan")
        limit = TARGET_CHECKS["pacemaker_vs_bare_rps_c64"]
        checks.append(("Pacemaker / bare proxy req/s, JSON c=64", fmt(ratio), f">= {limit}", _verdict(ratio >= limit)))
    pm, bare = get("pacemaker", "json_c1"), get("bare", "json_c1")
    if pm and bare:
        added = pm.percentile(50) - bare.percentile(50)
        limit = TARGET_CHECKS["pacemaker_added_p50_ms_c1"]
        checks.append(("Pacemaker added p50, JSON c=1", f"{fmt(added)} ms", f"<= {limit} ms", _verdict(added <= limit)))
    pm, bare = get("pacemaker", "sse_c64"), get("bare", "sse_c64")
    if pm and bare:
        ratio = pm.rps / bare.rps if bare.rps else float("nan")
        checks.append(("Pacemaker / bare proxy streams/s, SSE c=64", fmt(ratio), "(info)", ""))
    for scenario in ("json_c1", "json_c64", "sse_c64"):
        pm, bare = get("pacemaker", scenario), get("bare", scenario)
        if pm and bare:
            added = pm.server_cpu_ms_per_request - bare.server_cpu_ms_per_request
            label = f"server CPU Pacemaker adds per request, {pm.scenario.label}"
            checks.append((label, f"{fmt(added, 3)} ms", "(info)", ""))
    if checks:
        lines += ["| check | measured | target | verdict |", "|---|---:|---|---|"]
        lines += [f"| {name} | {value} | {target} | {verdict} |" for name, value, target, verdict in checks]
    failed = sum(sum(r.errors.values()) for r in results)
    if failed:
        lines += [
            "",
            f"**{failed} requests failed** (see the progress output on stderr): the rows with errors measure"
            " refusals, not the proxy, and the checks built on them are void.",
        ]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


# ---------------------------------------------------------------------------------------------
# Main

SCENARIOS = {
    "json_c1": Scenario("json_c1", "JSON c=1", 1, stream=False),
    "json_c64": Scenario("json_c64", "JSON c=64", 64, stream=False),
    "sse_c64": Scenario("sse_c64", "SSE c=64", 64, stream=True),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="repeat every row; the median round by req/s is shown (default 3)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--targets", default="upstream,bare,pacemaker", help="comma-separated subset")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then record Pacemaker with py-spy for SECONDS under load (default: off)",
    )
    parser.add_argument(
        "--profile-scenario", default="json_c64", choices=list(SCENARIOS), help="the load while profiling"
    )
    parser.add_argument("--profile-out", type=Path, help="where to keep py-spy's raw stacks (default: a temp file)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = parser.parse_args(argv)
    if not (
        0.5 <= args.seconds <= 600 and 0 <= args.warmup <= 60 and 0 <= args.profile <= 120 and 1 <= args.rounds <= 20
    ):
        parser.error("--seconds must be in [0.5, 600], --warmup in [0, 60], --profile in [0, 120], --rounds in [1, 20]")
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = [s for s in args.scenarios if s not in SCENARIOS] + [
        t for t in args.targets if t not in ("upstream", "bare", "pacemaker")
    ]
    if unknown:
        parser.error(f"unknown scenario or target: {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = (
        not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
    )
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-"))
    children: list[Child] = []
    results: list[Result] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            bare = start_bare_proxy(workdir, fake.port, children)
            pacemaker, key = start_pacemaker(workdir, fake.port, children)
            targets = {
                "upstream": Target("upstream", "upstream (direct)", f"http://{HOST}:{fake.port}{PATH}", {}, fake),
                "bare": Target("bare", "bare proxy", f"http://{HOST}:{bare.port}{PATH}", {}, bare),
                "pacemaker": Target(
                    "pacemaker",
                    "Pacemaker",
                    f"http://{HOST}:{pacemaker.port}{PATH}",
                    {"Authorization": f"Bearer {key}"},
                    pacemaker,
                ),
            }
            for target in targets.values():
                for scenario in SCENARIOS.values():
                    runner.run(smoke(target, scenario))

            for round_no in range(1, args.rounds + 1):
                for scenario_key in args.scenarios:
                    scenario = SCENARIOS[scenario_key]
                    for target_key in args.targets:
                        target = targets[target_key]
                        if pinning:
                            pin_for(target, children)
                        log(f"round {round_no}/{args.rounds}  {scenario.label:10} {target.label:18} ...")
                        result = runner.run(run_load(target, scenario, args.warmup, args.seconds, children))
                        result.round_no = round_no
                        results.append(result)
                        log(
                            f"{'':20} {result.rps:,.0f} req/s, p50 {result.percentile(50):.2f} ms,"
                            f" p99 {result.percentile(99):.2f} ms, {result.server_cpu_ms_per_request:.3f} CPU ms/req"
                        )
                        for error, count in result.errors.most_common(3):
                            log(f"{'':20} {count} x {error}")

            print(render(results, args, pinning))
            if args.json:
                args.json.write_text(json.dumps([_as_dict(r) for r in results], indent=2) + "\n")

            if args.profile > 0:
                target = targets["pacemaker"]
                if pinning:
                    pin_for(target, children)
                out = args.profile_out or workdir / "pacemaker.pyspy.txt"
                scenario = SCENARIOS[args.profile_scenario]
                log(f"profiling Pacemaker for {args.profile:g} s under {scenario.label} load -> {out}")
                profile_pacemaker(runner, target, scenario, args.profile, out, children, pinning)
                print(f"#### Where Pacemaker's CPU goes ({scenario.label}, py-spy {args.profile:g} s)\n")
                print(summarise_profile(out))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return 0


def _as_dict(r: Result) -> dict[str, Any]:
    return {
        "round": r.round_no,
        "target": r.target.key,
        "scenario": r.scenario.key,
        "requests": r.requests,
        "window_s": r.window_s,
        "rps": r.rps,
        "p50_ms": r.percentile(50),
        "p99_ms": r.percentile(99),
        "server_cpu_ms_per_request": r.server_cpu_ms_per_request,
        "server_cpu_s": r.server_cpu_s,
        "loadgen_cpu_s": r.loadgen_cpu_s,
        "other_cpu_s": r.other_cpu_s,
        "errors": dict(r.errors),
    }


if __name__ == "__main__":
    sys.exit(main())
