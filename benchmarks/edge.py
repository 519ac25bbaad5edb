"""Benchmark what the edge limits (app/edge/) cost: the chat route with them off, on, and before them; and per request.

    .venv/bin/python -m benchmarks.edge [--rounds 5] [--seconds 5] [--baseline REF] [--smoke]

Part A, servers under chat_proxy's load generator (POST /v1/chat/completions on the fake upstream,
JSON at concurrency 64 by default), every row once per round, rows taking turns within a round so
that drift on a shared machine hits them alike; the ratios are of rows of the same round:

  before    --baseline REF: Pacemaker at that commit (git archive), the code before edge limits
  off       this checkout, server.edge.enabled false
  on        this checkout, the defaults (6000/minute: the load passes it within seconds of each
            window, after which its known key is what lets it through)
  counting  this checkout, a rate the load never reaches (every request counted, never over)
  redis off / redis counting   the same two with limits.redis_url (a redis-server of its own):
            counting then makes one Redis call per request

Part B, in process: the middleware's own time per request (a do-nothing app inside it) within the
rate, over it with a known key, and refused; and a request from an address the edge does not count.

--smoke runs every row once for half a second, unpinned (figures mean nothing), and exits 1 if a
row is missing or a request failed, as a full run does. Markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import yaml

from benchmarks.chat_proxy import MODEL, PATH, SCENARIOS, Result, Target, medians, probe, run_load
from benchmarks.harness import (
    HOST,
    ROOT,
    Child,
    can_pin,
    child_env,
    clean_up,
    exit_status,
    fmt,
    free_port,
    log,
    new_loop,
    pin_under_test,
    start_fake_upstream,
    start_redis,
    terminate_on_sigterm,
    wait_for_quiet_machine,
)

NEVER = "1000000000/minute"
KEY = "pk_" + "k" * 43  # the shape of a real key: its hash is part of the known-key check
LABELS = {
    "before": "before edge limits",
    "off": "edge off",
    "on": "edge on (defaults)",
    "counting": "edge on, counting every request",
    "redis_off": "Redis, edge off",
    "redis_counting": "Redis, edge counting in Redis",
}
PAIRS = [  # (base, other): other / base req/s, base / other server CPU per request
    ("off", "on"),
    ("off", "counting"),
    ("before", "on"),
    ("redis_off", "redis_counting"),
]


def _config(workdir: Path, upstream_port: int, edge: dict[str, Any] | None, redis_url: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        "audit": {"spool_dir": str(workdir / "audit-spool")},
        "tasks": {"spool_dir": str(workdir / "task-spool")},
        "server": {"access_log": False},
        # As in chat_proxy: enforcement on, with key limits the load never reaches.
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
    if edge is not None:  # None: code from before server.edge existed (it would refuse the setting)
        config["server"]["edge"] = edge
    if redis_url is not None:
        config["limits"]["redis_url"] = redis_url
    return config


def start_pacemaker(name: str, workdir: Path, config: dict[str, Any], children: list[Child], code: Path) -> Target:
    """`pacemaker serve` of the code at `code` (this checkout, or a baseline tree), on a fresh SQLite database."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "pacemaker.yaml"
    config_path.write_text(yaml.safe_dump(config))
    environment = child_env(PACEMAKER_CONFIG=str(config_path))
    launcher = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(code)!r}); from app.cli import main; main()",
    ]

    def cli(*args: str) -> str:
        done = subprocess.run([*launcher, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: pacemaker {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    cli("migrate")
    key: str = json.loads(cli("keys", "create", "--name", "bench", "--json"))["key"]
    port = free_port()
    child = Child(name, [*launcher, "serve", "--port", str(port)], environment, workdir / "server.log", port)
    children.append(child)
    child.wait_for_port()
    return Target(name, LABELS[name], f"http://{HOST}:{port}", {"Authorization": f"Bearer {key}"}, child)


def baseline_tree(ref: str, into: Path) -> Path:
    """The files of commit `ref`, unpacked under `into` (git archive: the repository is not touched)."""
    archive = into / "baseline.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, stdout=out, check=True, timeout=60)
    tree = into / "baseline"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


# ---------------------------------------------------------------------------------------------
# Part B: the middleware alone, in process


async def middleware_costs(requests: int) -> list[tuple[str, float]]:
    """Microseconds of the edge middleware per request, with an app inside it that does nothing."""
    from prometheus_client import CollectorRegistry

    from app.auth.authenticator import Authenticator
    from app.auth.keys import hash_key
    from app.edge.limiter import EdgeLimiter
    from app.edge.metrics import EdgeMetrics
    from app.edge.middleware import EdgeMiddleware
    from app.edge.settings import EdgeSettings

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(_message: Any) -> None:
        return None

    def scope(resources: Any, path: str = PATH) -> dict[str, Any]:
        headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")]
        headers += [(b"authorization", b"Bearer " + KEY.encode()), (b"user-agent", b"bench"), (b"accept", b"*/*")]
        return {
            "type": "http",
            "path": path,
            "method": "POST",
            "headers": headers,
            "client": ("10.0.0.1", 5000),
            "state": {"resources": resources, "request_id": "r"},
        }

    def resources(rate: str, knows: bool) -> Any:
        settings = EdgeSettings(rate=rate)
        edge = EdgeLimiter(settings, EdgeMetrics.register(CollectorRegistry()))
        # The real key cache (hash and look up), holding the request's key when it is to be known.
        authenticator = Authenticator(None, cache_seconds=30, cache_size=10)  # type: ignore[arg-type]  # never reads
        if knows:
            authenticator._remember(hash_key(KEY), cast(Any, object()), time.monotonic() + 3600)
        return SimpleNamespace(edge=edge, authenticator=authenticator, audit=None)

    cases = [
        ("a request within the rate (counted in process)", resources(NEVER, True), PATH),
        ("a request over the rate, its key known (served)", resources("1/hour", True), PATH),
        ("a request over the rate, its key unknown (refused, 429)", resources("1/hour", False), PATH),
        ("a health probe (not counted)", resources(NEVER, True), "/health/ready"),
    ]
    figures = []
    for label, res, path in cases:
        middleware = EdgeMiddleware(inner)
        scopes = [scope(res, path) for _ in range(requests)]
        await middleware(scope(res, path), receive, send)  # over the limit from here on where it is 1/hour
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for one in scopes:
                await middleware(one, receive, send)
            best = min(best, (time.perf_counter() - started) / requests)
        # Less the same loop around the bare app: what the middleware itself adds.
        started = time.perf_counter()
        for one in scopes:
            await inner(one, receive, send)
        bare = (time.perf_counter() - started) / requests
        figures.append((label, (best - bare) * 1e6))
    return figures


# ---------------------------------------------------------------------------------------------
# Report


def _paired(results: Sequence[Result], base: str, other: str, scenario: str) -> tuple[list[float], list[float]] | None:
    by_round: dict[int, dict[str, Result]] = {}
    for r in results:
        if r.scenario.key == scenario:
            by_round.setdefault(r.round_no, {})[r.target.key] = r
    pairs = [(row[base], row[other]) for row in by_round.values() if base in row and other in row]
    if not pairs:
        return None
    rps = [b.rps / a.rps if a.rps else float("nan") for a, b in pairs]
    cpu = [a.server_cpu_ms_per_request / b.server_cpu_ms_per_request for a, b in pairs]
    return rps, cpu


def _median_range(values: list[float]) -> str:
    return f"{fmt(statistics.median(values), 3)} ({fmt(min(values), 3)}-{fmt(max(values), 3)})"


def render(results: Sequence[Result], costs: list[tuple[str, float]], args: argparse.Namespace, pinning: bool) -> str:
    rows = medians(results)
    lines = [
        "### Edge limits: POST /v1/chat/completions with them off, on, and before them",
        "",
        f"{'server under test pinned to CPU 0, the rest to CPU 1' if pinning else 'not pinned'};"
        f" {args.warmup:g} s warm-up + {args.seconds:g} s per row; median of {args.rounds} rounds by req/s;"
        f" rows take turns within each round{f'; before: {args.baseline}' if args.baseline else ''}.",
        "",
        "| scenario | target | req/s | req/s, all rounds | p50 ms | p99 ms | server CPU ms/req | server CPU % |"
        " other CPU % | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (_target, _scenario), (r, all_rps) in rows.items():
        errors = sum(sum(x.errors.values()) for x in results if x.target is r.target and x.scenario is r.scenario)
        lines.append(
            f"| {r.scenario.label} | {r.target.label} | {fmt(r.rps, 0)} | {' / '.join(fmt(x, 0) for x in all_rps)}"
            f" | {fmt(r.percentile(50))} | {fmt(r.percentile(99))} | {fmt(r.server_cpu_ms_per_request, 3)}"
            f" | {fmt(100 * r.server_cpu_s / r.window_s, 0)} | {fmt(100 * r.other_cpu_s / r.window_s, 0)} | {errors} |"
        )
    lines += [
        "",
        "Paired by round (median, range): other / base req/s, and base / other server CPU per request"
        " (1.0: no difference; below 1: the other row is costlier).",
        "",
        "| scenario | rows | req/s ratio | CPU per request ratio |",
        "|---|---|---:|---:|",
    ]
    for scenario in args.scenarios:
        for base, other in PAIRS:
            paired = _paired(results, base, other, scenario)
            if paired:
                rps, cpu = paired
                lines.append(
                    f"| {SCENARIOS[scenario].label} | {LABELS[other]} / {LABELS[base]} | {_median_range(rps)}"
                    f" | {_median_range(cpu)} |"
                )
    lines += ["", "| in process: the edge middleware's own time | µs per request |", "|---|---:|"]
    lines += [f"| {label} | {fmt(us, 2)} |" for label, us in costs]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median by req/s is shown (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--scenarios", default="json_c64", help="comma-separated subset of chat_proxy's scenarios")
    parser.add_argument("--baseline", metavar="REF", help="also measure Pacemaker at this commit (`before`)")
    parser.add_argument("--no-redis", action="store_true", help="leave out the rows with Redis")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish first")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--requests", type=int, default=100_000, help="part B: requests per case (default 100,000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin, args.requests = 0.5, 0.2, 1, True, 2_000
    if not (0.5 <= args.seconds <= 600 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 20):
        parser.error("--seconds must be in [0.5, 600], --warmup in [0, 60], --rounds in [1, 20]")
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario: {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.smoke or args.no_wait):
        wait_for_quiet_machine()
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-edge-"))
    children: list[Child] = []
    results: list[Result] = []
    failures: list[str] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            log("part B: the middleware in process")
            costs = runner.run(middleware_costs(args.requests))
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            redis_url = None if args.no_redis else f"redis://{HOST}:{start_redis(workdir, children).port}/0"
            plans: dict[str, tuple[dict[str, Any] | None, str | None, Path]] = {}
            if args.baseline:
                plans["before"] = (None, None, baseline_tree(args.baseline, workdir))
            plans["off"] = ({"enabled": False}, None, ROOT)
            plans["on"] = ({}, None, ROOT)
            plans["counting"] = ({"rate": NEVER}, None, ROOT)
            if redis_url is not None:
                plans["redis_off"] = ({"enabled": False}, redis_url, ROOT)
                plans["redis_counting"] = ({"rate": NEVER}, redis_url, ROOT)
            targets = {
                name: start_pacemaker(
                    name, workdir / name, _config(workdir / name, fake.port, edge, url), children, code
                )
                for name, (edge, url, code) in plans.items()
            }
            for target in targets.values():
                for scenario in args.scenarios:
                    runner.run(probe(target, SCENARIOS[scenario]))
            for round_no in range(1, args.rounds + 1):
                for scenario_key in args.scenarios:
                    scenario = SCENARIOS[scenario_key]
                    # Each round in another order, so that no row always follows the same one.
                    order = list(targets.values())
                    shift = (round_no - 1) % len(order)
                    for target in order[shift:] + order[:shift]:
                        if pinning:
                            pin_under_test(target.server, children)
                        log(f"round {round_no}/{args.rounds}  {scenario.label:10} {target.label:32} ...")
                        result = runner.run(run_load(target, scenario, args.warmup, args.seconds, children))
                        result.round_no = round_no
                        results.append(result)
                        log(
                            f"{'':20} {result.rps:,.0f} req/s, p50 {result.percentile(50):.2f} ms,"
                            f" {result.server_cpu_ms_per_request:.3f} CPU ms/req"
                        )
                        for error, count in result.errors.most_common(3):
                            log(f"{'':20} {count} x {error}")
            for result in results:
                failures += result.problems(f"round {result.round_no}, {result.scenario.label}, {result.target.label}")
            seen = {(r.round_no, r.scenario.key, r.target.key) for r in results}
            failures += [
                f"round {round_no}, {scenario}, {key}: no figures"
                for round_no in range(1, args.rounds + 1)
                for scenario in args.scenarios
                for key in targets
                if (round_no, scenario, key) not in seen
            ]
            print(render(results, costs, args, pinning))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
