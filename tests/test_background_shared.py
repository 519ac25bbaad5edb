"""Background tasks across instances sharing PostgreSQL and Redis: follow and resume from any instance,
cancel from another one, and a task whose instance is killed ends as worker_lost, never run twice."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import (
    PacemakerServer,
    RedisServer,
    fresh_postgres_database,
    read_sse,
    server_config,
    start_pacemaker,
)

LEASE_S = 4.0


@dataclass
class Cluster:
    a: PacemakerServer
    b: PacemakerServer
    database_url: str
    config: dict[str, Any]
    root: Path

    def start(self, name: str) -> PacemakerServer:
        workdir = self.root / name
        config = {**self.config, **_own_dirs(workdir)}
        return start_pacemaker(workdir, config)


def _own_dirs(workdir: Path) -> dict[str, Any]:
    # Each instance its own journals: a shared one would replay one instance's records as its own.
    return {
        "audit": {"spool_dir": str(workdir / "audit-spool")},
        "tasks": {"spool_dir": str(workdir / "task-spool"), "lease_s": LEASE_S, "lease_renew_s": 0.5},
        "auth": {"dev_key_file": str(workdir / "dev-key")},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("shared-tasks")
    redis = RedisServer(root)
    redis.start()
    with fresh_postgres_database("pacemaker_background") as url:
        config = server_config(root, fake_upstream, database={"url": url}, limits={"redis_url": redis.url})
        started = Cluster(a=None, b=None, database_url=url, config=config, root=root)  # type: ignore[arg-type]
        started.a = started.start("a")
        started.b = started.start("b")
        try:
            yield started
        finally:
            for server in (started.a, started.b):
                server.process.stop()
            redis.kill()


def _key_of(cluster: Cluster) -> str:
    return cluster.a.key  # keys live in the shared database: any instance takes any key


async def _events(http: httpx.AsyncClient, task_id: str, **headers: str) -> AsyncIterator[dict[str, Any]]:
    async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for event in read_sse(response):
            yield event.json()


async def _wait_done(http: httpx.AsyncClient, task_id: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resource: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}")).json()
        if resource["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return resource
        await asyncio.sleep(0.1)


async def _audit_rows(database_url: str, task_id: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return [dict(row) for row in await connection.fetch("SELECT * FROM audit_record WHERE task_id = $1", task_id)]
    finally:
        await connection.close()


async def _rows_eventually(database_url: str, task_id: str, timeout_s: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await _audit_rows(database_url, task_id)
        if rows or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_a_client_follows_a_task_from_both_instances_and_sees_every_event_once(
    cluster: Cluster, upstream_stats: httpx.AsyncClient
) -> None:
    """Created on A; read from B, dropped after 5 events; resumed on A with Last-Event-ID: 5; then on B."""
    before = (await upstream_stats.get("/_control/stats")).json()["completion_tokens"]
    key = _key_of(cluster)
    seen: list[dict[str, Any]] = []
    async with cluster.a.client(key) as on_a, cluster.b.client(key) as on_b:
        body = {"query": "a long story #delay=0.05 #tokens=60", "model": "fake-model", "background": True}
        accepted = await on_a.post("/v1/tasks", json=body)
        assert accepted.status_code == 202
        task_id = accepted.json()["id"]
        async for event in _events(on_b, task_id):
            seen.append(event)
            if len(seen) == 5:
                break
        async for event in _events(on_a, task_id, **{"Last-Event-ID": "5"}):
            seen.append(event)
            if len(seen) == 20:
                break
        async for event in _events(on_b, task_id, **{"Last-Event-ID": "20"}):
            seen.append(event)
        done = await _wait_done(on_b, task_id)
    assert [event["seq"] for event in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["type"] == "task.completed" and done["status"] == "completed"
    assert "".join(event["delta"] for event in seen if event["type"] == "token.delta") == done["output"]
    served = (await upstream_stats.get("/_control/stats")).json()["completion_tokens"] - before
    rows = await _rows_eventually(cluster.database_url, task_id)
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["http_status"] == 202
    assert served == done["usage"]["completion_tokens"] == rows[0]["completion_tokens"] == 60


async def test_a_cancel_sent_to_another_instance_stops_the_task_within_a_second(
    cluster: Cluster, upstream_stats: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:10]
    key = _key_of(cluster)
    async with cluster.a.client(key) as on_a, cluster.b.client(key) as on_b:
        body = {"query": f"endless #delay=0.05 #tokens=1000 #tag={tag}", "model": "fake-model", "background": True}
        task_id = (await on_a.post("/v1/tasks", json=body)).json()["id"]
        await asyncio.sleep(0.5)
        asked = time.monotonic()
        cancelled = await on_b.post(f"/v1/tasks/{task_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert time.monotonic() - asked < 1.5
        events = [event async for event in _events(on_b, task_id)]
    assert events[-1]["type"] == "task.failed" and events[-1]["code"] == "cancelled"
    stats = (await upstream_stats.get("/_control/stats")).json()
    assert any(seen["tag"] == tag for seen in stats["disconnects"]), "the upstream kept generating"
    rows = await _rows_eventually(cluster.database_url, task_id)
    assert len(rows) == 1 and rows[0]["status"] == "cancelled"


async def test_a_task_whose_instance_is_killed_ends_as_worker_lost_and_is_not_run_again(
    cluster: Cluster, upstream_stats: httpx.AsyncClient
) -> None:
    doomed = cluster.start(f"doomed-{uuid.uuid4().hex[:6]}")
    tag = uuid.uuid4().hex[:10]
    key = _key_of(cluster)
    try:
        async with doomed.client(key) as on_doomed:
            body = {"query": f"slow #delay=0.1 #tokens=600 #tag={tag}", "model": "fake-model", "background": True}
            task_id = (await on_doomed.post("/v1/tasks", json=body)).json()["id"]
            await asyncio.sleep(1.0)
    finally:
        doomed.process.stop(signal.SIGKILL)
    killed = time.monotonic()
    async with cluster.b.client(key) as on_b:
        done = await _wait_done(on_b, task_id, timeout_s=LEASE_S + 15)
        events = [event async for event in _events(on_b, task_id)]
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
    assert time.monotonic() - killed < LEASE_S + 5 + 5  # the lease, the sweep interval and a margin
    assert events[-1]["type"] == "task.failed" and events[-1]["code"] == "worker_lost"
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    rows = await _rows_eventually(cluster.database_url, task_id)
    assert len(rows) == 1 and rows[0]["error_code"] == "worker_lost", rows
    assert rows[0]["completion_tokens"] == sum(event["type"] == "token.delta" for event in events)
    await asyncio.sleep(1.0)
    assert (await upstream_stats.get("/_control/stats")).json()["by_tag"].get(tag) == 1  # never run again


async def test_finished_tasks_answer_after_a_restart(cluster: Cluster) -> None:
    key = _key_of(cluster)
    async with cluster.b.client(key) as on_b:
        task_id = (await on_b.post("/v1/tasks", json={"query": "remember me", "background": True})).json()["id"]
        done = await _wait_done(on_b, task_id)
    cluster.b.process.stop()
    cluster.b = cluster.start(f"b-again-{uuid.uuid4().hex[:6]}")
    async with cluster.b.client(key) as on_b:
        again = (await on_b.get(f"/v1/tasks/{task_id}")).json()
        events = [event async for event in _events(on_b, task_id)]
    assert again == done
    assert events[-1]["type"] == "task.completed" and events[-1]["output"] == done["output"]
    assert json.loads(json.dumps(events[0]))["seq"] == 1
