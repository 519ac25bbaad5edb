"""Benchmark idle memory: `pacemaker serve` on the embedded defaults, warmed up, then where its RSS goes.

    .venv/bin/python -m benchmarks.memory [--warm-requests 20] [--sandbox-runs 10] [--smoke]

Starts the fake upstream (tests/fakes/upstream.py) and `pacemaker serve` on SQLite in a temporary
directory, one worker, the sandbox enabled (tools.python, the default; the module cache is the
default var/sandbox-cache, compiled on a clean checkout's first start), the simulated models and
one model on the fake upstream. Then:

1. idle after start: RSS, USS and PSS (psutil's memory_full_info) after 4 s idle, and the CPU
   the server spent over those 4 s (its own timers);
2. warm-up without the sandbox: chat completions (JSON and SSE) on the fake upstream, tasks on the
   simulated model (which calls the calculator), a direct calculator call; idle again, measured;
3. the first python-tool call (`print(1+1)` through POST /v1/tools/python/invoke), timed from the
   client: it pays whatever the sandbox left for its first use (the server logs how long loading
   the runtime took, which is shown too); then warm calls, timed;
4. idle again, measured: the sandbox used.

The breakdown: the server's mappings by kind (/proc/PID/smaps: anonymous memory, which is mostly
Python objects, and each file-backed mapping: libpython, the wasmtime library, the compiled
module, ...); the cost of each import group, measured in a fresh interpreter (`python -c`):
cumulative RSS after importing each group in the order the server needs them, and which groups an
app started in process (`python -c`: create_app plus its lifespan, the same settings) has loaded; and
the floor: the libraries Pacemaker cannot do without, imported, under uvicorn serving one route.

Memory figures are robust to other work on the machine; latencies are not (say so when it was busy).
--smoke does every step with the fewest requests (seconds). Either way the exit status is 1 if a
request failed, a row is missing or a figure could not be computed. Everything printed on stdout
is markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.harness import (
    HOST,
    ROOT,
    Child,
    child_env,
    clean_up,
    exit_status,
    fmt,
    free_port,
    log,
    new_loop,
    pacemaker_cli,
    serve_pacemaker,
    start_fake_upstream,
    terminate_on_sigterm,
    verdict,
    write_config,
)

MIB = 1024 * 1024
IDLE_TARGET_MB = 80.0
SETTLE_S = 4.0  # idle time before each memory reading (and the idle CPU over it)
MODEL = "fake-model"
# Import groups in the order `pacemaker serve` needs them; each is measured on top of the ones before.
IMPORT_GROUPS: dict[str, list[str]] = {
    "asyncio, uvloop": ["asyncio", "uvloop"],
    "pydantic, fastapi, starlette": ["pydantic", "fastapi"],
    "sqlalchemy (asyncio, orm), aiosqlite, sqlmodel": ["sqlalchemy.ext.asyncio", "aiosqlite", "sqlmodel"],
    "uvicorn": ["uvicorn", "uvicorn.protocols.http.httptools_impl"],
    "prometheus_client, yaml, orjson, psutil": ["prometheus_client", "yaml", "orjson", "psutil"],
    "pydantic_settings": ["pydantic_settings"],
    "redis (asyncio)": ["redis.asyncio"],
    "aiohttp (the HTTP tools' client)": ["aiohttp"],
    "limits": ["limits.aio.strategies", "limits.aio.storage"],
    "opentelemetry sdk": ["opentelemetry.sdk.trace"],
    "jsonschema": ["jsonschema"],
    "pydantic.v1 (FastAPI's check that no response model is one)": ["pydantic.v1"],
    "wasmtime": ["wasmtime"],
    "app.cli (settings, the CLI)": ["app.cli"],
    "app.server": ["app.server"],
    "app.main (every route, middleware, the lifespan's modules)": ["app.main"],
}
# Top-level packages whose presence in sys.modules says a group was loaded.
GROUP_MARKERS = {
    "redis (asyncio)": "redis",
    "aiohttp (the HTTP tools' client)": "aiohttp",
    "limits": "limits",
    "opentelemetry sdk": "opentelemetry.sdk",
    "jsonschema": "jsonschema",
    "pydantic.v1 (FastAPI's check that no response model is one)": "pydantic.v1",
    "wasmtime": "wasmtime",
}


def config(workdir: Path, upstream_port: int) -> dict[str, Any]:
    """The embedded defaults, but SQLite, the dev key file and sessions in the work directory."""
    return {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        "audit": {"spool_dir": str(workdir / "audit-spool")},
        "tasks": {"spool_dir": str(workdir / "task-spool")},
        "sandbox": {"sessions_dir": str(workdir / "sandbox-sessions")},
        "server": {"access_log": False},
        "providers": {
            "simulated": {"kind": "simulated", "tokens_per_second": 0},
            "fake": {"kind": "openai", "base_url": f"http://{HOST}:{upstream_port}/v1", "api_key": "sk-bench"},
        },
        "models": {
            **{name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
            MODEL: {"provider": "fake"},
        },
    }


# ---------------------------------------------------------------------------------------------
# Measurements of the server


def memory(process: psutil.Process) -> dict[str, float]:
    info = process.memory_full_info()
    return {"rss": info.rss / MIB, "uss": info.uss / MIB, "pss": info.pss / MIB}


def idle_memory(process: psutil.Process) -> dict[str, float]:
    """Memory after SETTLE_S idle, and the process's CPU over that time (ms per second: its own timers)."""
    before = process.cpu_times()
    time.sleep(SETTLE_S)
    after = process.cpu_times()
    cpu = (after.user + after.system - before.user - before.system) * 1000 / SETTLE_S
    return memory(process) | {"idle_cpu_ms_per_s": cpu}


def mappings(pid: int) -> list[tuple[str, float]]:
    """RSS by mapping: anonymous memory (heap, arenas, stacks) together, each file on its own; largest first."""
    by_path: dict[str, float] = {}
    path = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            name = fields[5] if len(fields) > 5 else ""
            path = "anonymous (heap, Python objects, stacks)" if name in ("", "[heap]", "[stack]") else name
        elif fields[0] == "Rss:":
            by_path[path] = by_path.get(path, 0.0) + int(fields[1]) / 1024
    return sorted(by_path.items(), key=lambda item: -item[1])


def label_mapping(path: str) -> str:
    if path.endswith(".cwasm"):
        return "the compiled sandbox module (.cwasm, mmapped)"
    if "_libwasmtime" in path:
        return "the wasmtime library (_libwasmtime.so)"
    if "libpython" in path:
        return "libpython"
    return path.split("site-packages/", 1)[-1]


async def call(
    http: aiohttp.ClientSession, url: str, payload: dict[str, Any], headers: dict[str, str], failures: list[str]
) -> tuple[float, bytes]:
    """POST one request; its latency (ms) and body. A failure is recorded, not raised."""
    began = time.perf_counter()
    async with http.post(url, json=payload, headers=headers) as response:
        body = await response.read()
        elapsed = (time.perf_counter() - began) * 1000
        if response.status != 200:
            failures.append(f"POST {url}: HTTP {response.status} {body[:200]!r}")
    return elapsed, body


async def warm_up(base: str, key: str, requests: int, failures: list[str]) -> dict[str, int]:
    """Chat completions (JSON and SSE), tasks (with a calculator call), direct calculator calls: no sandbox."""
    headers = {"Authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": "Name twelve Greek letters, please."}]
    done = {"chat JSON": 0, "chat SSE": 0, "tasks": 0, "calculator calls": 0}
    async with aiohttp.ClientSession() as http:
        for _ in range(requests):
            await call(http, f"{base}/v1/chat/completions", {"model": MODEL, "messages": messages}, headers, failures)
            done["chat JSON"] += 1
            stream = {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
            _, body = await call(http, f"{base}/v1/chat/completions", stream, headers, failures)
            if not body.endswith(b"data: [DONE]\n\n"):
                failures.append(f"a streamed chat completion did not end with [DONE]: {body[-200:]!r}")
            done["chat SSE"] += 1
        for _ in range(max(1, requests // 4)):
            _, body = await call(http, f"{base}/v1/tasks", {"query": "What is 17 * 23 + 4?"}, headers, failures)
            if b"395" not in body:
                failures.append(f"a task did not compute 395: {body[:300]!r}")
            done["tasks"] += 1
            invoke = {"arguments": {"expression": "17 * 23 + 4"}}
            await call(http, f"{base}/v1/tools/calculator/invoke", invoke, headers, failures)
            done["calculator calls"] += 1
    return done


async def sandbox_calls(base: str, key: str, runs: int, failures: list[str]) -> tuple[float, list[float]]:
    """The first python-tool call's latency, then `runs` warm ones (ms), each checked."""
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{base}/v1/tools/python/invoke"
    timings = []
    async with aiohttp.ClientSession() as http:
        for _ in range(runs + 1):
            elapsed, body = await call(http, url, {"arguments": {"code": "print(1+1)"}}, headers, failures)
            try:
                result = json.loads(body).get("result") or {}
            except ValueError:
                result = {}
            if result.get("status") != "ok" or result.get("stdout") != "2\n":
                failures.append(f"a python-tool call did not print 2: {body[:300]!r}")
            timings.append(elapsed)
    return timings[0], timings[1:]


# ---------------------------------------------------------------------------------------------
# Import groups, in fresh interpreters


# Run with `python -c`: nothing of this module (or of the harness) is imported first.
IMPORTS_CHILD = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
rows = [{"group": "the interpreter", "rss": rss(), "modules": len(sys.modules)}]
for group, modules in json.loads(sys.argv[1]).items():
    for module in modules:
        __import__(module)
    rows.append({"group": group, "rss": rss(), "modules": len(sys.modules)})
print(json.dumps(rows))
"""


def import_groups() -> list[dict[str, Any]]:
    """Cumulative RSS after each import group, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_CHILD, json.dumps(IMPORT_GROUPS)], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the import child exited with {done.returncode}:\n{done.stderr[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


# What an app started in process (create_app, its lifespan) has imported, and its RSS; one JSON line. Run
# with `python -c` too, so that what this module imports (aiohttp, the harness) does not count.
APP_CHILD = """
import asyncio, json, os, sys
os.environ["PACEMAKER_CONFIG"] = sys.argv[1]
from app.config import load_settings
from app.main import create_app

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

async def started():
    app = create_app(load_settings())
    async with app.router.lifespan_context(app):
        markers = json.loads(sys.argv[2])
        loaded = {group: marker in sys.modules for group, marker in markers.items()}
        return {"rss": rss(), "modules": len(sys.modules), "loaded": loaded}

print(json.dumps(asyncio.run(started())))
"""


# The floor: the libraries `pacemaker serve` cannot do without, imported, and uvicorn serving an
# app of one route that answers "ok" (no Pacemaker module at all).
FLOOR_MODULES = [
    "uvloop",
    "fastapi",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql",  # the tables' postgresql_where indexes import it on any database
    "aiosqlite",
    "sqlmodel",
    "prometheus_client",
    "yaml",
    "orjson",
    "psutil",
    "pydantic_settings",
    "limits.aio.storage",  # the edge limits, on by default
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl",
]
FLOOR_CHILD = """
import sys
for module in sys.argv[2].split(","):
    __import__(module)
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", log_level="warning")
"""


def floor(workdir: Path, children: list[Child]) -> dict[str, float]:
    """Idle memory of the floor server, after a few requests."""
    port = free_port()
    args = [sys.executable, "-c", FLOOR_CHILD, str(port), ",".join(FLOOR_MODULES)]
    children.append(child := Child("floor", args, child_env(), workdir / "floor.log", port))
    child.wait_for_port()

    async def requests() -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                async with http.get(f"http://{HOST}:{port}/") as response:
                    await response.read()

    asyncio.run(requests())
    figures = idle_memory(child.process)
    child.stop()
    return figures


def run_child(config_path: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", APP_CHILD, config_path, json.dumps(GROUP_MARKERS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the app child exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report


def render(figures: dict[str, Any], args: argparse.Namespace) -> str:
    readings: dict[str, dict[str, float]] = figures["readings"]
    lines = [
        "### Idle memory of `pacemaker serve` (one worker, embedded defaults, the sandbox enabled)",
        "",
        f"SQLite, the simulated models and one on the fake upstream; {SETTLE_S:g} s idle before each reading."
        f" Warm-up: {', '.join(f'{n} {what}' for what, n in figures['warm_up'].items())}.",
        "",
        "| state | sandbox used | RSS MB | USS MB | PSS MB | idle CPU ms/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for state, used in (("after start", "no"), ("after warm-up", "no"), ("after sandbox calls", "yes")):
        if state in readings:
            r = readings[state]
            lines.append(
                f"| {state} | {used} | {fmt(r['rss'], 1)} | {fmt(r['uss'], 1)} | {fmt(r['pss'], 1)}"
                f" | {fmt(r['idle_cpu_ms_per_s'], 0)} |"
            )
    first, warm = figures.get("first_sandbox_ms", float("nan")), figures.get("warm_sandbox_ms", [])
    if warm:
        lines += [
            "",
            "| python tool, `print(1+1)` over HTTP | ms |",
            "|---|---:|",
            f"| first call (loads what the sandbox left for its first use) | {fmt(first, 1)} |",
            f"| of which loading the runtime, as the server logs it | {fmt(figures.get('load_ms', float('nan')), 0)} |",
            f"| warm calls, median of {len(warm)} | {fmt(statistics.median(warm), 1)} |",
            f"| warm calls, max | {fmt(max(warm), 1)} |",
        ]
    for state in ("after warm-up", "after sandbox calls"):
        maps = figures.get("mappings", {}).get(state)
        if not maps:
            continue
        lines += ["", f"#### Where the RSS goes, {state} (/proc/PID/smaps, mappings over 0.5 MB)", ""]
        lines += ["| mapping | RSS MB |", "|---|---:|"]
        shown = [(label_mapping(p), mb) for p, mb in maps if mb >= 0.5]
        lines += [f"| {name} | {mb:.1f} |" for name, mb in shown]
        rest = sum(mb for _, mb in maps) - sum(mb for _, mb in shown)
        lines.append(f"| every other mapping | {rest:.1f} |")
    imports: list[dict[str, Any]] = figures.get("imports", [])
    app: dict[str, Any] = figures.get("app", {})
    if imports:
        lines += [
            "",
            "#### Import groups, cumulative, in a fresh interpreter",
            "",
            "Each group imported on top of the ones above it (RSS of the importing process); last column: whether"
            " an app started in process (create_app and its lifespan, the same settings) has loaded it.",
            "",
            "| import group | RSS MB | + MB | modules | loaded at idle |",
            "|---|---:|---:|---:|---|",
        ]
        previous = None
        for row in imports:
            added = row["rss"] - previous if previous is not None else float("nan")
            loaded = app.get("loaded", {}).get(row["group"])
            shown = "" if loaded is None else ("yes" if loaded else "no (on first use)")
            lines.append(f"| {row['group']} | {row['rss']:.1f} | {fmt(added, 1)} | {row['modules']} | {shown} |")
            previous = row["rss"]
        if app:
            lines.append(
                f"| in process: create_app and its lifespan, started | {app['rss']:.1f} | | {app['modules']} | |"
            )
    floor_figures: dict[str, float] = figures.get("floor", {})
    if floor_figures:
        lines += [
            "",
            "The floor: the libraries Pacemaker cannot do without, imported, and uvicorn serving one route that"
            " answers `ok` (no Pacemaker module), idle after 20 requests:"
            f" RSS {fmt(floor_figures['rss'], 1)} MB, USS {fmt(floor_figures['uss'], 1)} MB,"
            f" PSS {fmt(floor_figures['pss'], 1)} MB.",
        ]
    floor_rss = figures.get("floor", {}).get("rss", float("nan"))
    idle = readings.get("after warm-up", {}).get("rss", float("nan"))
    used = readings.get("after sandbox calls", {}).get("rss", float("nan"))
    lines += [
        "",
        "| check | measured | target | verdict |",
        "|---|---:|---|---|",
        f"| idle RSS after warm-up <= {IDLE_TARGET_MB:g} MB (sandbox enabled, not yet used) | {fmt(idle, 1)} MB"
        f" | <= {IDLE_TARGET_MB:g} MB | {verdict(idle <= IDLE_TARGET_MB)} |",
        f"| idle RSS after warm-up and sandbox calls | {fmt(used, 1)} MB | (info) | |",
        f"| first sandbox call | {fmt(first, 1)} ms | (info) | |",
        f"| idle RSS of the floor (the libraries alone under uvicorn) | {fmt(floor_rss, 1)} MB | (info) | |",
    ]
    if figures["failures"]:
        lines += ["", f"**{len(figures['failures'])} requests failed** (see stderr): the figures are void."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--warm-requests", type=int, default=20, help="chat completions of each kind (default 20)")
    parser.add_argument("--sandbox-runs", type=int, default=10, help="warm python-tool calls (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every step with the fewest requests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.warm_requests, args.sandbox_runs = 2, 2
    if min(args.warm_requests, args.sandbox_runs) < 1:
        parser.error("--warm-requests and --sandbox-runs must be at least 1")
    return args


def measure(args: argparse.Namespace, workdir: Path, children: list[Child]) -> dict[str, Any]:
    failures: list[str] = []
    figures: dict[str, Any] = {"readings": {}, "mappings": {}, "failures": failures, "warm_up": {}}
    fake = start_fake_upstream(workdir, children)
    env = write_config(workdir / "pacemaker.yaml", config(workdir, fake.port))
    pacemaker_cli(env, "migrate")
    key: str = json.loads(pacemaker_cli(env, "keys", "create", "--name", "bench", "--json"))["key"]
    log("starting pacemaker serve...")
    server = serve_pacemaker("pacemaker", env, workdir / "pacemaker.log", children)
    base = f"http://{HOST}:{server.port}"
    figures["readings"]["after start"] = idle_memory(server.process)
    log(f"after start: {figures['readings']['after start']}")
    with asyncio.Runner(loop_factory=new_loop) as runner:
        log("warm-up (no sandbox)...")
        figures["warm_up"] = runner.run(warm_up(base, key, args.warm_requests, failures))
        figures["readings"]["after warm-up"] = idle_memory(server.process)
        figures["mappings"]["after warm-up"] = mappings(server.popen.pid)
        log(f"after warm-up: {figures['readings']['after warm-up']}")
        log("python-tool calls...")
        first, warm = runner.run(sandbox_calls(base, key, args.sandbox_runs, failures))
        figures["first_sandbox_ms"], figures["warm_sandbox_ms"] = first, warm
        figures["readings"]["after sandbox calls"] = idle_memory(server.process)
        figures["mappings"]["after sandbox calls"] = mappings(server.popen.pid)
        log(f"first call {first:.1f} ms, warm median {statistics.median(warm):.1f} ms")
        # What the server says the load took (app/sandbox/sandbox.py logs it once).
        loaded = re.search(r"sandbox runtime loaded on first use in (\d+) ms", server.output())
        figures["load_ms"] = float(loaded.group(1)) if loaded else float("nan")
    log("import groups, in fresh interpreters...")
    figures["imports"] = import_groups()
    # The same settings, with spools of its own: the server still runs.
    own = config(workdir, fake.port)
    own["audit"]["spool_dir"] = str(workdir / "in-process-audit-spool")
    own["tasks"]["spool_dir"] = str(workdir / "in-process-task-spool")
    write_config(workdir / "in-process.yaml", own)
    figures["app"] = run_child(str(workdir / "in-process.yaml"))
    log("the floor: the libraries alone under uvicorn...")
    figures["floor"] = floor(workdir, children)
    if server.popen.poll() is not None:
        failures.append(f"the server exited with {server.popen.returncode}")
    return figures


def problems(figures: dict[str, Any]) -> list[str]:
    found = list(figures["failures"])
    for state in ("after start", "after warm-up", "after sandbox calls"):
        if state not in figures["readings"]:
            found.append(f"no memory reading {state}")
    if not figures.get("warm_sandbox_ms"):
        found.append("no sandbox timings")
    if not figures.get("imports") or not figures.get("app") or not figures.get("floor"):
        found.append("no import-group figures")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-memory-"))
    children: list[Child] = []
    try:
        with terminate_on_sigterm():
            figures = measure(args, workdir, children)
            print(render(figures, args))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(problems(figures))


if __name__ == "__main__":
    sys.exit(main())
