"""Benchmark what tracing costs the chat route: tracing off, on (every span exported), 10 % sampled, and before it.

Usage (--help for every option):

    .venv/bin/python -m benchmarks.tracing [--rounds 3] [--seconds 5] [--baseline REF] [--profile 10] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import pyspy
from benchmarks.chat_proxy import MODEL, SCENARIOS, Result, Target, medians, probe, run_load
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
    terminate_on_sigterm,
    verdict,
    wait_for_quiet_machine,
)

ON_TARGET = 0.90  # on / off req/s at JSON c=64
ON_SERVICE = "pacemaker-bench"  # the service.name of `on`, whose spans the receiver counts


def _config(workdir: Path, upstream_port: int) -> dict[str, Any]:
    return {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        "audit": {"spool_dir": str(workdir / "audit-spool")},
        "tasks": {"spool_dir": str(workdir / "task-spool")},
        "server": {"access_log": False},
        # As in chat_proxy: enforcement on, with limits the load never reaches.
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


def start_pacemaker(
    name: str, workdir: Path, upstream_port: int, children: list[Child], code: Path, **env: str
) -> tuple[Child, str]:
    """`pacemaker serve` of the code at `code` (this checkout, or a baseline), on a fresh SQLite database."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "pacemaker.yaml"
    config_path.write_text(yaml.safe_dump(_config(workdir, upstream_port)))
    environment = child_env(PACEMAKER_CONFIG=str(config_path), **env)
    # The code at `code` first on the path, whatever the working directory (the harness's is this checkout).
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
    children.append(
        child := Child(name, [*launcher, "serve", "--port", str(port)], environment, workdir / "server.log", port)
    )
    child.wait_for_port()
    return child, key


def commit_tree(ref: str, into: Path, name: str) -> Path:
    """The files of commit `ref`, unpacked under `into` (git archive: the repository is not touched)."""
    archive = into / f"{name}.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, stdout=out, check=True, timeout=60)
    tree = into / name
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def _get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as answer:
        found: dict[str, Any] = json.loads(answer.read())
        return found


def spans_received(receiver: Child, service: str) -> int:
    return int(_get(receiver.port, "/_control/stats")["by_service"].get(service, 0))


def requests_served(server: Child) -> int:
    """Every request the server has answered so far (its /health counter, this one included)."""
    return int(_get(server.port, "/health")["total_requests"])


def render(results: Sequence[Result], args: argparse.Namespace, pinning: bool, spans: dict[str, float]) -> str:
    rows = medians(results)
    lines = [
        "### Tracing: POST /v1/chat/completions with tracing off, on (every span exported), and before tracing",
        "",
        f"Code: {args.ref or 'the working tree'}; "
        f"{'server under test pinned to CPU 0, the rest to CPU 1' if pinning else 'not pinned'};"
        f" {args.warmup:g} s warm-up + {args.seconds:g} s per row; median of {args.rounds} rounds by req/s;"
        " `on`: OTEL_TRACES_SAMPLER=always_on, OTLP/HTTP to a local receiver process. Other CPU %: work on the"
        " machine outside this benchmark during the row (rows with much of it are noise).",
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

    def get(target: str, scenario: str) -> tuple[Result, list[float]] | None:
        return rows.get((target, scenario))

    checks: list[tuple[str, str, str, str]] = []
    for scenario in args.scenarios:
        label = SCENARIOS[scenario].label
        target = f">= {ON_TARGET}" if scenario == "json_c64" else "(info)"
        # Ratios of rows run next to each other in the same round: drift on a shared machine cancels out.
        before_off = _paired(results, "before", "off", scenario)
        if before_off:
            rps, cpu = before_off
            costlier = sum(1 for ratio in cpu if ratio < 1)
            checks.append((f"off / before req/s, {label} (median of rounds)", _median_range(rps), "(info)", ""))
            checks.append(
                (
                    f"before / off server CPU per request, {label}",
                    _median_range(cpu),
                    f"off not costlier in almost every round (now {costlier} of {len(cpu)})",
                    verdict(costlier < len(cpu) - 1) if len(cpu) >= 5 else "(too few rounds)",
                )
            )
        off_on = _paired(results, "off", "on", scenario)
        if off_on:
            rps, cpu = off_on
            outcome = verdict(_median(rps) >= ON_TARGET) if scenario == "json_c64" else ""
            checks.append((f"on / off req/s, {label}", _median_range(rps), target, outcome))
            # A saturated core serves 1 / (CPU per request): steadier than req/s when other work shares the machine.
            outcome = verdict(_median(cpu) >= ON_TARGET) if scenario == "json_c64" else ""
            checks.append((f"on / off by server CPU per request, {label}", _median_range(cpu), target, outcome))
        off_sampled = _paired(results, "off", "sampled", scenario)
        if off_sampled:
            rps, cpu = off_sampled
            checks.append((f"10 % sampled / off req/s, {label}", _median_range(rps), "(info)", ""))
            checks.append((f"10 % sampled / off by server CPU per request, {label}", _median_range(cpu), "(info)", ""))
    checks.append(
        (
            "spans the receiver got from `on` (2 per chat completion, and audit batches)",
            f"{spans['exported']:,.0f}",
            f">= {spans['expected']:,.0f} (none dropped)",
            verdict(spans["exported"] >= spans["expected"]),
        )
    )
    lines += ["", "| check | measured | target | verdict |", "|---|---:|---|---|"]
    lines += [f"| {name} | {value} | {target} | {outcome} |" for name, value, target, outcome in checks]
    return "\n".join(lines) + "\n"


def _paired(results: Sequence[Result], base: str, other: str, scenario: str) -> tuple[list[float], list[float]] | None:
    """Per round: other / base req/s, and base / other server CPU per request (both > 1 when `other` is cheaper)."""
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


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else float("nan")


def _median_range(values: list[float]) -> str:
    return f"{fmt(_median(values), 3)} ({fmt(min(values), 2)}-{fmt(max(values), 2)})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median by req/s is shown (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    parser.add_argument("--scenarios", default="json_c1,json_c64,sse_c64", help="comma-separated subset")
    parser.add_argument("--baseline", metavar="REF", help="also measure Pacemaker at this commit (`before`)")
    parser.add_argument("--ref", metavar="REF", help="measure this commit, not the working tree (default)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish first")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--profile", type=float, default=0.0, metavar="SECONDS", help="then py-spy `on` under JSON c=64 (default: off)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every row once, briefly, unpinned")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds, args.no_pin = 0.5, 0.2, 1, True
    if not (0.5 <= args.seconds <= 600 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 20):
        parser.error("--seconds must be in [0.5, 600], --warmup in [0, 60], --rounds in [1, 20]")
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario: {', '.join(unknown)}")
    return args


# The servers: the fake upstream, an OTLP/HTTP receiver counting spans by service (tests/fakes/otlp_receiver.py),
# and Pacemaker from this checkout three times (`off`: no OTEL_* variable; `on`: always_on, to the receiver;
# `sampled`: parentbased_traceidratio 0.1), plus `before` from --baseline REF (git archive). They take turns
# within each round under chat_proxy's load generator and scenarios. --smoke: every row once, briefly,
# unpinned; the exit status is 1 if a row is missing, a request failed, a figure could not be computed, or
# `on` exported fewer spans than its requests made.
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.smoke or args.no_wait):
        wait_for_quiet_machine()
    pinning = can_pin(args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-bench-tracing-"))
    children: list[Child] = []
    results: list[Result] = []
    failures: list[str] = []
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_loop) as runner:
            log(f"starting servers in {workdir}")
            fake = start_fake_upstream(workdir, children)
            receiver_port = free_port()
            receiver_args = [
                sys.executable,
                "-m",
                "tests.fakes.otlp_receiver",
                "--port",
                str(receiver_port),
                "--count-only",
            ]
            children.append(
                receiver := Child("receiver", receiver_args, child_env(), workdir / "receiver.log", receiver_port)
            )
            receiver.wait_for_port()
            servers: dict[str, tuple[Child, str]] = {}
            # The code measured: the working tree, or a commit (without anyone's uncommitted edits).
            code = commit_tree(args.ref, workdir, "measured") if args.ref else ROOT
            if args.baseline:
                tree = commit_tree(args.baseline, workdir, "baseline")
                servers["before"] = start_pacemaker("before", workdir / "before", fake.port, children, tree)
            servers["off"] = start_pacemaker("off", workdir / "off", fake.port, children, code)
            servers["on"] = start_pacemaker(
                "on",
                workdir / "on",
                fake.port,
                children,
                code,
                OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{HOST}:{receiver_port}",
                OTEL_SERVICE_NAME=ON_SERVICE,
                OTEL_TRACES_SAMPLER="always_on",
            )
            # What an operator would run: a tenth of the traces recorded (the rest cost a non-recording span).
            servers["sampled"] = start_pacemaker(
                "sampled",
                workdir / "sampled",
                fake.port,
                children,
                code,
                OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{HOST}:{receiver_port}",
                OTEL_SERVICE_NAME="pacemaker-bench-sampled",
                OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                OTEL_TRACES_SAMPLER_ARG="0.1",
            )
            labels = {
                "before": f"before ({args.baseline})",
                "off": "tracing off",
                "on": "tracing on",
                "sampled": "on, 10 % sampled",
            }
            targets = {
                key: Target(key, labels[key], f"http://{HOST}:{child.port}", {"Authorization": f"Bearer {k}"}, child)
                for key, (child, k) in servers.items()
            }
            for target in targets.values():
                for scenario in args.scenarios:
                    runner.run(probe(target, SCENARIOS[scenario]))

            spans_before, served_before = spans_received(receiver, ON_SERVICE), requests_served(servers["on"][0])
            for round_no in range(1, args.rounds + 1):
                for scenario_key in args.scenarios:
                    scenario = SCENARIOS[scenario_key]
                    for target in targets.values():
                        if pinning:
                            pin_under_test(target.server, children)
                        log(f"round {round_no}/{args.rounds}  {scenario.label:10} {target.label:18} ...")
                        result = runner.run(run_load(target, scenario, args.warmup, args.seconds, children))
                        result.round_no = round_no
                        results.append(result)
                        log(
                            f"{'':20} {result.rps:,.0f} req/s, p50 {result.percentile(50):.2f} ms,"
                            f" {result.server_cpu_ms_per_request:.3f} CPU ms/req"
                        )
                        for error, count in result.errors.most_common(3):
                            log(f"{'':20} {count} x {error}")
            if args.profile > 0:
                target, scenario = targets["on"], SCENARIOS["json_c64"]
                out = workdir / "on.pyspy.txt"

                def load(duration: int) -> None:
                    runner.run(run_load(target, scenario, 1.0, duration + 1.5, children))

                pyspy.record(target.server.popen.pid, args.profile, out, load, pinning)
                log(f"#### Where `on` spends its CPU (JSON c=64, py-spy {args.profile:g} s)\n\n{pyspy.summarise(out)}")
            # Every chat completion since the first count has a request span and a model call's (the
            # closing /health request, counted too, has none); the server flushes what it holds as it stops.
            served = requests_served(servers["on"][0]) - served_before - 1
            servers["on"][0].stop()
            exported = spans_received(receiver, ON_SERVICE) - spans_before
            spans = {"exported": float(exported), "expected": float(2 * served)}

            for result in results:
                failures += result.problems(f"round {result.round_no}, {result.scenario.label}, {result.target.label}")
            seen = {(r.round_no, r.scenario.key, r.target.key) for r in results}
            for round_no in range(1, args.rounds + 1):
                for scenario_key in args.scenarios:
                    failures += [
                        f"round {round_no}, {scenario_key}, {key}: no figures"
                        for key in targets
                        if (round_no, scenario_key, key) not in seen
                    ]
            if spans["exported"] < spans["expected"]:
                failures.append(f"tracing on: {spans['exported']:.0f} spans exported, {spans['expected']:.0f} expected")
            print(render(results, args, pinning, spans))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        clean_up(children, workdir, keep=args.keep)
    return exit_status(failures)


if __name__ == "__main__":
    sys.exit(main())
