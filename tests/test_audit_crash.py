"""kill -9 under load loses no answered request's row: each is journaled before the response's last byte."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support import ManagedProcess, fresh_postgres_database, server_config, start_pacemaker

CONCURRENCY = 48
ANSWERED_BEFORE_KILL = 300
LOAD_TIMEOUT_S = 60.0
ARRIVAL_TIMEOUT_S = 10.0


@pytest.fixture
def database_url() -> Iterator[str]:
    with fresh_postgres_database("pacemaker_audit_crash") as url:
        yield url


async def rows_per_request(url: str) -> Counter[str]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return Counter(record["request_id"] for record in await connection.fetch("SELECT request_id FROM audit_record"))
    finally:
        await connection.close()


async def test_every_request_answered_before_a_kill_9_has_exactly_one_row(tmp_path: Path, database_url: str) -> None:
    config = server_config(
        tmp_path, None, database={"url": database_url}, limits={"rpm": 100_000_000, "max_concurrency": 10_000}
    )
    server = start_pacemaker(tmp_path, config)
    answered: set[str] = set()
    sent: set[str] = set()
    killed = asyncio.Event()

    async def client() -> None:
        async with server.client() as http:
            while not killed.is_set():
                request_id = f"crash-{uuid.uuid4().hex}"
                sent.add(request_id)
                try:
                    response = await http.post("/v1/tasks", json={"query": "q"}, headers={"X-Request-ID": request_id})
                    complete = response.status_code == 200 and response.json()["status"] == "completed"
                except (httpx.HTTPError, ValueError):
                    continue  # cut off by the kill: no complete answer, so no promise
                if complete:
                    answered.add(request_id)

    clients = [asyncio.create_task(client()) for _ in range(CONCURRENCY)]
    deadline = asyncio.get_running_loop().time() + LOAD_TIMEOUT_S
    while len(answered) < ANSWERED_BEFORE_KILL:  # however busy the machine is
        assert asyncio.get_running_loop().time() < deadline, f"the load did not get going: {len(answered)} answers"
        await asyncio.sleep(0.05)
    server.process.stop(signal.SIGKILL)  # mid-load: no shutdown, no flush
    killed.set()
    await asyncio.gather(*clients)

    port = server.base_url.rsplit(":", 1)[1]
    args = [sys.executable, "-m", "app.cli", "serve", "--port", port]
    restarted = ManagedProcess(args, server.env, tmp_path / "restarted.log")  # same database, same journal
    try:
        restarted.wait_for_port(int(port))
        deadline = asyncio.get_running_loop().time() + ARRIVAL_TIMEOUT_S
        while not answered <= (found := await rows_per_request(database_url)).keys():
            assert asyncio.get_running_loop().time() < deadline, f"{len(answered - found.keys())} answered rows lost"
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # and nothing arrives twice after them
        found = await rows_per_request(database_url)
    finally:
        restarted.stop()
    assert [request_id for request_id in answered if found[request_id] != 1] == []
    assert [request_id for request_id, count in found.items() if count > 1] == []
    assert found.keys() <= sent
