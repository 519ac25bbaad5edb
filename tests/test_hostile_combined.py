"""One hostile key and one ordinary key on the same server, at the same time, on PostgreSQL.

The hostile key sends what once broke a shared resource: sandbox guests that flood descriptors and
disk or exit with statuses wasmtime refuses, arguments holding a lone surrogate, a NUL in the path,
bodies nested past every encoder's limit. The ordinary key's traffic must see only 2xx, /health must
answer every poll, and afterwards every request of both keys has exactly one audit row.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets

from tests.support import PacemakerServer, fresh_postgres_database, server_config, start_pacemaker
from tests.test_sandbox_abuse import HOSTILE, poll_health

MIB = 1024 * 1024
ROUNDS = 3


def _deep(depth: int) -> bytes:
    return b'{"query": "x", "context": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


@pytest.fixture(scope="module")
def hostile_server(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: str
) -> Iterator[tuple[PacemakerServer, str]]:
    with fresh_postgres_database("pacemaker_hostile") as url:
        workdir = tmp_path_factory.mktemp("hostile")
        # A name, so that the tool is allowed to reach the fake upstream on loopback.
        echo = fake_upstream.replace("127.0.0.1", "localhost") + "/tools/echo"
        config = server_config(
            workdir,
            fake_upstream,
            database={"url": url},
            sandbox={"max_write_bytes": 8 * MIB, "session_workspace_mb": 2, "sessions_dir": str(workdir / "ws")},
            tools={
                "http": [
                    {
                        "name": "echo",
                        "description": "echoes its arguments",
                        "url": echo,
                        "method": "POST",
                        "allow_private": True,
                        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                    }
                ]
            },
        )
        server = start_pacemaker(workdir, config)
        try:
            yield server, url.replace("postgresql+asyncpg", "postgresql")
        finally:
            server.process.stop()


async def _hostile_round(http: httpx.AsyncClient, round_number: int, sent: list[str]) -> list[int]:
    """Every hostile request of one round, one after another: their statuses (each must be a 2xx or 4xx)."""
    statuses = []

    async def send(name: str, method: str, path: str, body: object = None, raw: bytes | None = None) -> None:
        request_id = f"hostile-{round_number}-{name}"
        sent.append(request_id)
        headers = {"X-Request-ID": request_id, "Content-Type": "application/json"}
        response = await http.request(method, path, headers=headers, json=body, content=raw)
        statuses.append(response.status_code)

    for kind, (code, _expected) in HOSTILE.items():
        body: dict[str, object] = {"arguments": {"code": code, "timeout_s": 5}}
        if kind == "workspace-flood":
            body["session_id"] = "hostile"
        await send(f"python-{kind}", "POST", "/v1/tools/python/invoke", body)
    await send("surrogate", "POST", "/v1/tools/echo/invoke", raw=b'{"arguments": {"q": "\\ud800"}}')
    await send("surrogate-task", "POST", "/v1/tasks", raw=b'{"query": "x", "tools": ["\\ud800"]}')
    await send("nul-path", "GET", "/v1/%00")
    for depth in (300, 900, 2000):
        await send(f"deep-{depth}", "POST", "/v1/tasks", raw=_deep(depth))
    await send("deep-chat", "POST", "/v1/chat/completions", raw=_deep(300))
    # On a socket: the deep message gets an error, the socket stays open for the next task (one row).
    socket_id = f"hostile-{round_number}-ws"
    url = str(http.base_url).replace("http://", "ws://").rstrip("/") + "/v1/ws"
    headers = {"Authorization": http.headers["authorization"], "X-Request-ID": socket_id}
    async with websockets.connect(url, additional_headers=headers) as socket:
        await socket.send(b'{"type": "task.create", ' + _deep(300)[1:])
        assert json.loads(await socket.recv())["code"] == "invalid_request"
        await socket.send(json.dumps({"type": "task.create", "query": "still here"}))
        while json.loads(await socket.recv())["type"] not in ("task.completed", "task.failed"):
            pass
    sent.append(f"{socket_id}:1")
    return statuses


async def _normal_traffic(http: httpx.AsyncClient, stop: asyncio.Event, sent: list[str]) -> list[tuple[str, int]]:
    """An ordinary client's mix, over and over until told to stop: (request id, status) of each."""
    outcomes = []
    n = 0
    while not stop.is_set():
        n += 1
        calls = [
            ("task", "/v1/tasks", {"query": "What is 6 * 7?"}),
            ("chat", "/v1/chat/completions", {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}),
            ("calculator", "/v1/tools/calculator/invoke", {"arguments": {"expression": "2 + 2"}}),
            ("echo", "/v1/tools/echo/invoke", {"arguments": {"q": "hello"}}),
            ("upstream", "/v1/tasks", {"query": "hello", "model": "fake-model"}),
        ]
        for name, path, body in calls:
            request_id = f"normal-{n}-{name}"
            sent.append(request_id)
            response = await http.post(path, json=body, headers={"X-Request-ID": request_id})
            outcomes.append((request_id, response.status_code))
        stream_id = f"normal-{n}-stream"
        sent.append(stream_id)
        async with http.stream(
            "POST", "/v1/tasks", json={"query": "stream it", "stream": True}, headers={"X-Request-ID": stream_id}
        ) as response:
            await response.aread()
            outcomes.append((stream_id, response.status_code))
    return outcomes


async def _rows_per_request(database_url: str, request_ids: list[str]) -> dict[str, int]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT request_id, count(*) AS n FROM audit_record WHERE request_id = ANY($1) GROUP BY request_id",
            request_ids,
        )
    finally:
        await connection.close()
    return {row["request_id"]: row["n"] for row in rows}


async def test_a_hostile_key_cannot_hurt_another_key_the_server_or_the_audit_log(
    hostile_server: tuple[PacemakerServer, str], tmp_path: Path
) -> None:
    server, database_url = hostile_server
    attacker_key = json.loads(server.cli("keys", "create", "--name", "attacker", "--json").stdout)["key"]
    hostile_ids: list[str] = []
    normal_ids: list[str] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(server.base_url, stop))
    async with server.client(attacker_key) as attacker, server.client() as bystander:
        normal = asyncio.create_task(_normal_traffic(bystander, stop, normal_ids))
        try:
            hostile_statuses = [
                status
                for round_number in range(ROUNDS)
                for status in await _hostile_round(attacker, round_number, hostile_ids)
            ]
        finally:
            stop.set()
        normal_outcomes = await normal
    health = await poller

    assert all(200 <= status < 500 for status in hostile_statuses), hostile_statuses
    refused = [(request_id, status) for request_id, status in normal_outcomes if not 200 <= status < 300]
    assert normal_outcomes and not refused, refused
    assert len(health) >= 10 and set(health) == {200}, health

    expected = hostile_ids + normal_ids
    counts: dict[str, int] = {}
    for _ in range(100):  # rows are written in batches, within a flush interval or two
        counts = await _rows_per_request(database_url, expected)
        if len(counts) == len(expected):
            break
        await asyncio.sleep(0.1)
    missing = sorted(set(expected) - set(counts))
    doubled = sorted(request_id for request_id, n in counts.items() if n != 1)
    assert not missing and not doubled, (missing, doubled)
