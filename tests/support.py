"""Test support: real server processes on free ports, service checks, and an SSE reader."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database on the shared server at 127.0.0.1:5432, dropped afterwards: its URL."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _admin_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_sql(sql: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    # In a thread of its own, so that it works from sync fixtures and from inside a running loop alike.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """A missing PostgreSQL or Redis fails the run in CI and skips the test elsewhere."""
    if port_open(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


class ManagedProcess:
    """A child process with its output in a log file, stopped (and reaped) on close."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    # Generous: a Pacemaker server's first start on a clean checkout compiles the sandbox's module
    # (seconds to tens of seconds on a busy 2-core machine) before it listens.
    def wait_for_port(self, port: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"process exited with {self.process.returncode}:\n{self.output()}")
            if port_open("127.0.0.1", port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listened on {port} within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class RedisServer:
    """A redis-server of the test's own, on a free port, which the test may kill and start again
    (never the machine's shared one)."""

    def __init__(self, log_dir: Path) -> None:
        if shutil.which("redis-server") is None:
            message = "redis-server is not installed"
            if IN_CI:
                pytest.fail(message + " (CI=true: a missing service is a failure)")
            pytest.skip(message)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log_dir = log_dir
        self._starts = 0
        self._process: ManagedProcess | None = None

    def start(self) -> None:
        self._starts += 1
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = ManagedProcess(args, os.environ, self._log_dir / f"redis-{self.port}-{self._starts}.log")
        self._process.wait_for_port(self.port)

    def stop(self) -> None:
        """SIGTERM, waited for; the end of a test's own Redis."""
        if self._process is not None:
            self._process.stop()
            self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung host)."""
        if self._process is not None:
            os.kill(self._process.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.kill(self._process.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self._process is not None:
            self._process.stop(signal.SIGKILL)
            self._process = None
        while port_open("127.0.0.1", self.port):
            time.sleep(0.01)


def start_fake_upstream(log_dir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess(
        [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port)],
        os.environ,
        log_dir / f"fake-upstream-{port}.log",
    )
    process.wait_for_port(port)
    return process, f"http://127.0.0.1:{port}"


@dataclass
class PacemakerServer:
    process: ManagedProcess
    base_url: str
    key: str
    env: dict[str, str]
    workdir: Path

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30, **kwargs)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, check=check)


def run_cli(env: Mapping[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def pacemaker_env(workdir: Path, config: dict[str, Any], **extra: str) -> dict[str, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "pacemaker.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}
    env.update(PACEMAKER_CONFIG=str(config_path), PYTHONUNBUFFERED="1", **extra)
    return env


def server_config(workdir: Path, upstream_url: str | None, **overrides: Any) -> dict[str, Any]:
    """Simulated models (no pacing) plus, when given, models served by the fake upstream."""
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'pacemaker.db'}"},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
        # Each server its own spool: a shared one would replay one server's rows into another's database.
        "audit": {"spool_dir": str(workdir / "audit-spool")},
        "tasks": {"spool_dir": str(workdir / "task-spool")},
        # Stopping a test server should not wait out a load balancer's grace; the drain tests set theirs.
        # Edge limits on (every request is counted), above what one test sends from 127.0.0.1: the suite's
        # tests of bad keys and bad input expect their 401s, not 429s. tests/test_edge_limits.py sets its own.
        "server": {"drain_grace_s": 0, "edge": {"rate": "100000/minute", "failed_auth": "10000/minute"}},
        "providers": {"simulated": {"kind": "simulated", "tokens_per_second": 0}},
        "models": {name: {"provider": "simulated"} for name in ("sim-small", "sim-medium", "sim-large")},
    }
    if upstream_url:
        config["providers"]["fake"] = {
            "kind": "openai",
            "base_url": f"{upstream_url}/v1",
            "api_key": "sk-fake",
            "read_timeout_s": 5,
        }
        config["models"]["fake-model"] = {
            "provider": "fake",
            "upstream_model": "fake-upstream-model",
            "input_usd_per_mtok": "1.0",
            "output_usd_per_mtok": "2.0",
        }
    _deep_update(config, overrides)
    return config


def start_pacemaker(workdir: Path, config: dict[str, Any], **extra_env: str) -> PacemakerServer:
    env = pacemaker_env(workdir, config, **extra_env)
    run_cli(env, "migrate")
    key = json.loads(run_cli(env, "keys", "create", "--name", "test", "--json").stdout)["key"]
    port = free_port()
    process = ManagedProcess(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, workdir / "server.log"
    )
    process.wait_for_port(port)
    return PacemakerServer(process, f"http://127.0.0.1:{port}", key, env, workdir)


def _deep_update(target: dict[str, Any], updates: Mapping[str, Any]) -> None:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


@dataclass
class SSEEvent:
    id: str | None
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def read_sse(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """Parse a text/event-stream body as it arrives (comments are skipped)."""
    fields: dict[str, list[str]] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield SSEEvent(
                    id=(fields.get("id") or [None])[0],
                    event=(fields.get("event") or [None])[0],
                    data="\n".join(fields["data"]),
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value.removeprefix(" "))
