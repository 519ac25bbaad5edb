"""Every benchmark runs at HEAD: each one's --smoke mode, as its own process, must exit 0."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.support import ROOT, require_service

# The slowest smoke takes about 20 s on a quiet 2-core machine; CI shares the machine.
SMOKE_TIMEOUT_S = 240
POSTGRES, REDIS = ("PostgreSQL", 5432), ("Redis", 6379)
# Modules of benchmarks/ that are not benchmarks themselves; every other one must have a --smoke.
HELPERS = {"__init__", "bare_proxy", "harness", "held_client", "loadgen", "pyspy"}
SERVICES = {"audit": (POSTGRES,), "enforcement": (REDIS,), "events": (REDIS,), "redis_client": (REDIS,)}
BENCHMARKS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem not in HELPERS)


def test_every_known_benchmark_is_found() -> None:
    assert {"audit", "chat_proxy", "enforcement", "events", "sandbox"} <= set(BENCHMARKS)


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 90)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke(name: str) -> None:
    for service, port in SERVICES.get(name, ()):
        require_service(service, "127.0.0.1", port)
    benchmark = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{name}", "--smoke"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = benchmark.communicate(timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the benchmark then stops its own servers (they run in sessions of their own).
        benchmark.send_signal(signal.SIGTERM)
        try:
            output, _ = benchmark.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            benchmark.kill()
            output, _ = benchmark.communicate()
        pytest.fail(f"benchmarks.{name} --smoke took over {SMOKE_TIMEOUT_S} s:\n{output[-6000:]}")
    # A new helper module in benchmarks/ is taken for a benchmark and fails here: list it in HELPERS.
    assert benchmark.returncode == 0, f"benchmarks.{name} --smoke exited {benchmark.returncode}:\n{output[-6000:]}"
    assert "|---" in output, f"benchmarks.{name} --smoke printed no table:\n{output[-6000:]}"
