"""What every benchmark here needs: child servers it starts, pins and reaps; CPU accounting; figures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import uvloop
import yaml

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# A Pacemaker server's first start on a clean checkout compiles the sandbox's module (seconds).
START_TIMEOUT_S = 120.0
SERVER_CPU = 0  # when pinning: the process under test
LOAD_CPU = 1  # when pinning: the load generator and every other process of the benchmark
WAIT_POLL_S = 20.0
WAIT_MAX_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without PACEMAKER_* settings (each server gets its own), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def pacemaker_cli(env: dict[str, str], *args: str, cwd: Path = ROOT) -> str:
    """Run `pacemaker ARGS` (migrate, keys create, ...) in its own process; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"pacemaker {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


class Child:
    """A server process in its own session, its output in a log file; stop() ends and reaps it."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path, port: int, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.process = psutil.Process(self.popen.pid)

    def wait_for_port(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: nothing listened on port {self.port} within {timeout} s:\n{self.output()}")

    def cpu_seconds(self) -> float:
        try:
            times = self.process.cpu_times()
        except psutil.Error:
            return float("nan")
        return float(times.user + times.system)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode


def write_config(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """Write a Pacemaker YAML config; the environment of a child process that reads it."""
    path.write_text(yaml.safe_dump(config))
    return child_env(PACEMAKER_CONFIG=str(path))


def serve_pacemaker(name: str, env: dict[str, str], log_path: Path, children: list[Child], cwd: Path = ROOT) -> Child:
    """`pacemaker serve` on a free port, listed in `children` before it is waited for (so it is always stopped);
    `cwd`: another checkout's code (a `git worktree` of an earlier commit), to compare within one run."""
    port = free_port()
    args = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    children.append(child := Child(name, args, env, log_path, port, cwd))
    child.wait_for_port()
    return child


def start_fake_upstream(workdir: Path, children: list[Child]) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port)]
    children.append(child := Child("fake upstream", args, child_env(), workdir / "fake-upstream.log", port))
    child.wait_for_port()
    return child


def start_redis(workdir: Path, children: list[Child]) -> Child:
    """A memory-only redis-server of the benchmark's own on a free port (never the machine's shared one)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    children.append(child := Child("redis", args, child_env(), workdir / "redis.log", port))
    child.wait_for_port()
    return child


def new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop()  # as under `pacemaker serve`


def can_pin(no_pin: bool) -> bool:
    """Whether to pin: not turned off, and both CPUs of the layout are ours to use."""
    return not no_pin and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)


def pin_under_test(server: Child, children: Sequence[Child]) -> None:
    """The process under test on its own CPU; the other servers and this process on the other."""
    for child in children:
        pin(child.popen.pid, {SERVER_CPU} if child is server else {LOAD_CPU})
    pin(os.getpid(), {LOAD_CPU})


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (sched_setaffinity on a pid moves only that thread); new ones inherit."""
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread.id, cpus)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that the children are stopped in every case."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def clean_up(children: list[Child], workdir: Path, *, keep: bool) -> None:
    """Stop the children (the last started first) and remove the work directory unless kept."""
    for child in reversed(children):
        child.stop()
    if keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs)."""
    cpu = psutil.cpu_times()
    busy = cpu.user + cpu.nice + cpu.system + getattr(cpu, "irq", 0) + getattr(cpu, "softirq", 0)
    return float(busy + getattr(cpu, "steal", 0))


def own_cpu() -> float:
    """This process's CPU seconds so far (user + system)."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def other_benchmarks() -> list[str]:
    """Command lines of `python -m benchmarks.*` processes other than this one (and its parents, children)."""
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.parents()} | {p.pid for p in me.children(recursive=True)}
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["pid"] in ours or not cmdline or not Path(cmdline[0]).name.startswith("python"):
            continue
        if any(a == "-m" and b.startswith("benchmarks.") for a, b in itertools.pairwise(cmdline)):
            found.append(f"{process.info['pid']}: {' '.join(cmdline)[:160]}")
    return found


def wait_for_quiet_machine() -> None:
    deadline = time.monotonic() + WAIT_MAX_S
    while busy := other_benchmarks():
        if time.monotonic() >= deadline:
            log(f"another benchmark still runs after {WAIT_MAX_S:.0f} s; measuring anyway (figures may suffer)")
            return
        log(f"waiting for another benchmark to finish (every {WAIT_POLL_S:.0f} s): {'; '.join(busy)}")
        time.sleep(WAIT_POLL_S)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank, of an already sorted sequence; NaN when it is empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def not_finite(figures: dict[str, float]) -> list[str]:
    """The names of the figures that could not be computed (NaN or infinite)."""
    return [name for name, value in figures.items() if not math.isfinite(value)]


def exit_status(failures: Sequence[str]) -> int:
    """1 if anything made the figures meaningless (each said on stderr), else 0."""
    for failure in failures:
        log(f"FAILED: {failure}")
    return 1 if failures else 0
