"""SIGTERM drains: readiness turns 503 at once, new work is refused, in-flight work ends normally (or with
shutting_down past the drain timeout), every request keeps exactly one audit row, and the exit is 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import websockets

from tests.support import PacemakerServer, fresh_postgres_database, read_sse, server_config, start_pacemaker

GRACE_S = 1.0
SLOW = "#delay=0.1 #tokens=50"  # about 5 s of tokens


def _config(workdir: Path, upstream: str, database_url: str, timeout_s: float) -> dict[str, Any]:
    return server_config(
        workdir,
        upstream,
        database={"url": database_url},
        server={"drain_grace_s": GRACE_S, "drain_timeout_s": timeout_s},
        limits={"max_concurrency": 200, "max_background_tasks": 10},
    )


async def _rows(database_url: str) -> dict[str, int]:
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await connection.fetch("SELECT request_id, count(*) AS n FROM audit_record GROUP BY request_id")
        return {row["request_id"]: row["n"] for row in rows}
    finally:
        await connection.close()


async def _task_statuses(database_url: str) -> dict[str, str]:
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return {row["id"]: row["status"] for row in await connection.fetch("SELECT id, status FROM task")}
    finally:
        await connection.close()


async def _stream(server: PacemakerServer, request_id: str) -> list[dict[str, Any]]:
    body = {"query": f"drain me {SLOW}", "model": "fake-model", "stream": True}
    async with (
        server.client() as http,
        http.stream("POST", "/v1/tasks", json=body, headers={"X-Request-ID": request_id}) as response,
    ):
        return [event.json() async for event in read_sse(response)]


async def _socket(server: PacemakerServer, request_id: str, count: int) -> tuple[list[str], int | None]:
    """`count` tasks on one socket: the type of each task's last event, and the close code."""
    url = server.base_url.replace("http://", "ws://") + "/v1/ws"
    headers = {"Authorization": f"Bearer {server.key}", "X-Request-ID": request_id}
    finals: list[str] = []
    async with websockets.connect(url, additional_headers=headers) as socket:
        for n in range(count):
            await socket.send(
                json.dumps({"type": "task.create", "ref": n, "query": f"ws {SLOW}", "model": "fake-model"})
            )
        try:
            while True:
                event = json.loads(await socket.recv())
                if event["type"] in ("task.completed", "task.failed"):
                    finals.append(event["type"])
        except websockets.ConnectionClosed as closed:
            return finals, closed.rcvd.code if closed.rcvd is not None else None


async def _poll_ready(server: PacemakerServer, signalled: float) -> tuple[float, dict[str, Any]]:
    """Seconds from the signal to a 503 readiness, and its body."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as http:
        while True:
            response = await http.get("/health/ready")
            if response.status_code == 503:
                return time.monotonic() - signalled, response.json()
            await asyncio.sleep(0.005)


async def test_sigterm_lets_every_stream_socket_and_background_task_end_and_exits_0(
    tmp_path: Path, fake_upstream: str
) -> None:
    with fresh_postgres_database("pacemaker_drain") as url:
        server = start_pacemaker(tmp_path, _config(tmp_path, fake_upstream, url, timeout_s=12))
        streams = [asyncio.create_task(_stream(server, f"drain-sse-{n}")) for n in range(50)]
        socket = asyncio.create_task(_socket(server, "drain-ws", 5))
        async with server.client() as http:
            background = [
                (await http.post("/v1/tasks", json={"query": f"bg {SLOW}", "model": "fake-model", "background": True}))
                for _ in range(3)
            ]
        assert [response.status_code for response in background] == [202] * 3
        await asyncio.sleep(1.0)  # every task under way
        signalled = time.monotonic()
        server.process.process.send_signal(signal.SIGTERM)
        took, ready = await _poll_ready(server, signalled)
        assert took < 0.1 + 0.2, took  # at once (the margin is this machine's scheduling, not the server's)
        assert ready["status"] == "draining"
        async with server.client() as http:
            refused = await http.post("/v1/tasks", json={"query": "too late"}, headers={"X-Request-ID": "drain-late"})
        assert refused.status_code == 503 and refused.json()["code"] == "shutting_down"
        assert refused.headers["connection"] == "close" and "retry-after" in refused.headers
        results = await asyncio.gather(*streams)
        finals, close_code = await socket
        code = await asyncio.to_thread(server.process.process.wait, 30)
        exited = time.monotonic() - signalled
        server.process.stop()
        assert code == 0, server.process.output()
        assert exited < 12 + 2 + 3, exited  # the drain timeout, uvicorn's close, and a margin
        assert all(events[-1]["type"] == "task.completed" for events in results)
        assert finals == ["task.completed"] * 5 and close_code == 1012
        rows = await _rows(url)
        expected = [f"drain-sse-{n}" for n in range(50)] + [f"drain-ws:{n}" for n in range(1, 6)] + ["drain-late"]
        assert all(rows.get(request_id) == 1 for request_id in expected), {r: rows.get(r) for r in expected}
        background_ids = [response.json()["id"] for response in background]
        statuses = await _task_statuses(url)
        assert [statuses[task_id] for task_id in background_ids] == ["completed"] * 3
        assert not list((tmp_path / "audit-spool").glob("segment-*")), "rows were left on disk, not written"
        assert not list((tmp_path / "task-spool").glob("segment-*"))


async def test_a_task_longer_than_the_drain_timeout_ends_with_shutting_down_and_its_row(
    tmp_path: Path, fake_upstream: str
) -> None:
    with fresh_postgres_database("pacemaker_drain_cut") as url:
        server = start_pacemaker(tmp_path, _config(tmp_path, fake_upstream, url, timeout_s=3))
        request_id = f"drain-long-{uuid.uuid4().hex[:6]}"
        body = {"query": "#delay=0.1 #tokens=300", "model": "fake-model", "stream": True}
        async with (
            server.client() as http,
            http.stream("POST", "/v1/tasks", json=body, headers={"X-Request-ID": request_id}) as response,
        ):
            events: list[dict[str, Any]] = []
            async for event in read_sse(response):
                events.append(event.json())
                if len(events) == 3:
                    server.process.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.process.process.wait, 30)
        server.process.stop()
        assert code == 0, server.process.output()
        assert events[-1]["type"] == "task.failed" and events[-1]["code"] == "shutting_down"
        assert events[-1]["retryable"] is True
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            row = await connection.fetchrow(
                "SELECT status, error_code FROM audit_record WHERE request_id = $1", request_id
            )
        finally:
            await connection.close()
        assert row is not None and (row["status"], row["error_code"]) == ("failed", "shutting_down")
