"""Benchmark POST /v1/chat/completions: the fake upstream alone, a bare aiohttp proxy, and Pacemaker.

    .venv/bin/python -m benchmarks.chat_proxy [--seconds 5] [--warmup 1] [--profile 10] [--smoke]

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

--smoke runs every row once for a fraction of a second, unpinned (seconds; figures mean nothing).
Either way the exit status is 1 if a row is missing, had a failed request, or has a figure that
could not be computed. Everything printed on stdout is markdown, ready for the README; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

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
    new_loop,
    pacemaker_cli,
    pin_under_test,
    serve_pacemaker,
    start_fake_upstream,
    terminate_on_sigterm,
    verdict,
    write_config,
)
from benchmarks.loadgen import Window, closed_loop, first_request

PATH = "/v1/chat/completions"
MODEL = "fake-model"

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name twelve Greek letters, please."},
]
TARGET_CHECKS = {"pacemaker_vs_bare_rps_c64": 0.6, "pacemaker_added_p50_ms_c1": 2.0}


# ---------------------------------------------------------------------------------------------
# Child processes


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
    env = write_config(workdir / "pacemaker.yaml", config)
    pacemaker_cli(env, "migrate")
    key: str = json.loads(pacemaker_cli(env, "keys", "create", "--name", "bench", "--json"))["key"]
    return serve_pacemaker("pacemaker", env, workdir / "pacemaker.log", children), key


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


@dataclass(kw_only=True)
class Result(Window):
    target: Target
    scenario: Scenario
    round_no: int = 1


async def run_load(
    target: Target, scenario: Scenario, warmup_s: float, seconds: float, children: Sequence[Child]
) -> Result:
    """Closed-loop load: `concurrency` workers send back to back for warm-up + seconds."""
    headers = {"Content-Type": "application/json", **target.headers}
    run = Result(target=target, scenario=scenario)
    body, valid = scenario.body(), scenario.valid
    return await closed_loop(
        run, target.url, body, headers, valid, scenario.concurrency, warmup_s, seconds, target.server, children
    )


async def probe(target: Target, scenario: Scenario) -> None:
    """One request per scenario before any load: a broken setup fails here, with the server's log."""
    headers = {"Content-Type": "application/json", **target.headers}
    label = f"{target.label}, {scenario.label}"
    await first_request(label, target.url, scenario.body(), headers, scenario.valid, target.server)


# ---------------------------------------------------------------------------------------------
# Report


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
        checks.append(("Pacemaker / bare proxy req/s, JSON c=64", fmt(ratio), f">= {limit}", verdict(ratio >= limit)))
    pm, bare = get("pacemaker", "json_c1"), get("bare", "json_c1")
    if pm and bare:
        added = pm.percentile(50) - bare.percentile(50)
        limit = TARGET_CHECKS["pacemaker_added_p50_ms_c1"]
        checks.append(("Pacemaker added p50, JSON c=1", f"{fmt(added)} ms", f"<= {limit} ms", verdict(added <= limit)))
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
        lines += [f"| {name} | {value} | {target} | {outcome} |" for name, value, target, outcome in checks]
    failed = sum(sum(r.errors.values()) for r in results)
    if failed:
        lines += [
            "",
            f"**{failed} requests failed** (see the progress output on stderr): the rows with errors measure"
            " refusals, not the proxy, and the checks built on them are void.",
        ]
    return "\n".join(lines) + "\n"


def problems(results: Sequence[Result], args: argparse.Namespace) -> list[str]:
    """What makes the figures meaningless: a row missing, a request failed, a figure that could not be computed."""
    found = [p for r in results for p in r.problems(f"round {r.round_no}, {r.scenario.label}, {r.target.label}")]
    seen = {(r.round_no, r.scenario.key, r.target.key) for r in results}
    for row in itertools.product(range(1, args.rounds + 1), args.scenarios, args.targets):
        if row not in seen:
            found.append(f"round {row[0]}, {SCENARIOS[row[1]].label}, {row[2]}: no figures")
    return found


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
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin = 0.5, 0.2, 1, True
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
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-"))
    children: list[Child] = []
    results: list[Result] = []
    failures: list[str] = []
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
                    runner.run(probe(target, scenario))

            for round_no in range(1, args.rounds + 1):
                for scenario_key in args.scenarios:
                    scenario = SCENARIOS[scenario_key]
                    for target_key in args.targets:
                        target = targets[target_key]
                        if pinning:
                            pin_under_test(target.server, children)
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

            failures += problems(results, args)
            print(render(results, args, pinning))
            if args.json:
                args.json.write_text(json.dumps([_as_dict(r) for r in results], indent=2) + "\n")

            if args.profile > 0:
                target = targets["pacemaker"]
                if pinning:
                    pin_under_test(target.server, children)
                out = args.profile_out or workdir / "pacemaker.pyspy.txt"
                scenario = SCENARIOS[args.profile_scenario]
                log(f"profiling Pacemaker for {args.profile:g} s under {scenario.label} load -> {out}")

                def load(duration: int) -> None:  # from before py-spy attaches until after it stops
                    runner.run(run_load(target, scenario, 1.0, duration + 1.5, children))

                pyspy.record(target.server.popen.pid, args.profile, out, load, pinning)
                print(f"#### Where Pacemaker's CPU goes ({scenario.label}, py-spy {args.profile:g} s)\n")
                print(pyspy.summarise(out))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


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
