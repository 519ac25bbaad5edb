"""Shared fixtures: one fake upstream process and one Pacemaker server process for the session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    ManagedProcess,
    PacemakerServer,
    RedisServer,
    server_config,
    start_fake_upstream,
    start_pacemaker,
)


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a fake OpenAI-compatible upstream running as its own process."""
    process, url = start_fake_upstream(tmp_path_factory.mktemp("fake-upstream"))
    yield url
    process.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    """A Pacemaker server process: simulated models (unpaced) and `fake-model` on the fake upstream.

    Its breaker never opens and it never retries, so that fault tests see each fault as it is;
    enforcement tests run servers of their own.
    """
    workdir = tmp_path_factory.mktemp("pacemaker")
    config = server_config(workdir, fake_upstream, breakers={"min_calls": 1_000_000}, retries={"max_retries": 0})
    started = start_pacemaker(workdir, config)
    yield started
    _stop(started.process)


@pytest.fixture
async def client(server: PacemakerServer) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as http:
        yield http


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may kill, restart or pause (never the machine's)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def upstream_stats(fake_upstream: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake_upstream, timeout=10) as http:
        yield http


def _stop(process: ManagedProcess) -> None:
    code = process.stop()
    if code not in (0, -15):
        raise AssertionError(f"server exited with {code}:\n{process.output()}")


def pytest_configure(config: pytest.Config) -> None:
    Path(config.rootpath, "var").mkdir(exist_ok=True)
