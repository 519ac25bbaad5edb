"""What every benchmark here needs: free ports, child server processes it stops and reaps, a log line."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# A Pacemaker server's first start on a clean checkout compiles the sandbox's module (seconds).
START_TIMEOUT_S = 120.0


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


def pacemaker_cli(env: dict[str, str], *args: str) -> str:
    """Run `pacemaker ARGS` (migrate, keys create, ...) in its own process; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"pacemaker {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


class Child:
    """A server process in its own session, its output in a log file; stop() ends and reaps it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
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
