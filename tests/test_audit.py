"""The audit log on PostgreSQL: exactly one row per request, whatever became of it, and none lost.

The mixed-load and disconnect tests use a fresh database on the shared server at 127.0.0.1:5432;
the outage and crash tests run a PostgreSQL cluster of their own, which they stop and start.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.postgres_cluster import PostgresCluster
from tests.support import (
    ManagedProcess,
    PacemakerServer,
    free_port,
    fresh_postgres_database,
    pacemaker_env,
    read_sse,
    server_config,
    start_pacemaker,
)

ROWS_TIMEOUT_S = 30.0


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def audit_rows(url: str, request_ids: set[str] | None = None) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(dsn(url))
    try:
        records = await connection.fetch("SELECT * FROM audit_record ORDER BY id")
    finally:
        await connection.close()
    rows = [dict(record) for record in records]
    return rows if request_ids is None else [row for row in rows if row["request_id"] in request_ids]


async def wait_for_rows(url: str, request_ids: set[str], timeout: float = ROWS_TIMEOUT_S) -> list[dict[str, Any]]:
    """Rows are written in batches off the request path: wait (bounded) until all have landed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            rows = await audit_rows(url, request_ids)
        except (OSError, asyncpg.PostgresError):
            rows = []
        if len({row["request_id"] for row in rows}) >= len(request_ids):
            await asyncio.sleep(0.5)  # and nothing more arrives after them (no duplicates)
            return await audit_rows(url, request_ids)
        if asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with fresh_postgres_database("pacemaker_audit") as url:
        yield url


@pytest.fixture(scope="module")
def audited(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: str, database_url: str
) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("audited")
    config = server_config(
        workdir,
        fake_upstream,
        database={"url": database_url},
        breakers={"min_calls": 1_000_000},
        retries={"max_retries": 0},
        limits={"rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrency": 1000},
    )
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


class Load:
    """Sends requests with request ids of our choosing, so every row can be matched to its request."""

    def __init__(self, server: PacemakerServer, concurrency: int = 32) -> None:
        self.server = server
        self.ids: dict[str, str] = {}  # request id -> what kind of request it was
        self._gate = asyncio.Semaphore(concurrency)
        self._clients: dict[str | None, httpx.AsyncClient] = {}

    def _client(self, key: str | None = None) -> httpx.AsyncClient:
        if key not in self._clients:
            self._clients[key] = self.server.client(key=key)
        return self._clients[key]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def new_id(self, kind: str) -> str:
        request_id = f"audit-{kind}-{uuid.uuid4().hex[:12]}"
        self.ids[request_id] = kind
        return request_id

    async def post(self, kind: str, path: str, body: Any, key: str | None = None) -> httpx.Response:
        async with self._gate:
            return await self._client(key).post(path, json=body, headers={"X-Request-ID": self.new_id(kind)})

    async def cancelled_stream(self, deltas: int) -> int:
        """A stream the client leaves after `deltas` tokens; returns how many it really received."""
        # The pause between tokens must outlast the server noticing the client gone (slower under this
        # load): a token already on its way when the upstream is closed was served but never received.
        body = {"query": "a slow story #delay=0.8 #tokens=60", "model": "fake-model", "stream": True}
        received = 0
        async with self._gate, self.server.client() as http:  # its own connection, which it drops
            headers = {"X-Request-ID": self.new_id("cancelled")}
            async with http.stream("POST", "/v1/tasks", json=body, headers=headers) as response:
                async for event in read_sse(response):
                    if event.event == "token.delta":
                        received += 1
                        if received == deltas:
                            break
        return received

    async def completed_stream(self) -> None:
        body = {"query": "a short story #tokens=7", "model": "fake-model", "stream": True}
        async with self._gate:
            headers = {"X-Request-ID": self.new_id("sse")}
            async with self._client().stream("POST", "/v1/tasks", json=body, headers=headers) as response:
                assert [e.event async for e in read_sse(response)][-1] == "task.completed"


async def test_two_thousand_mixed_requests_leave_exactly_two_thousand_rows(
    audited: PacemakerServer, database_url: str, upstream_stats: httpx.AsyncClient
) -> None:
    before = (await upstream_stats.get("/_control/stats")).json()
    limited = _key(audited, "--rpm", "1", "--burst", "1")
    load = Load(audited)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi #tokens=6"}]}
    jobs: list[Any] = []
    jobs += [load.post("task", "/v1/tasks", {"query": "hello #tokens=5", "model": "fake-model"}) for _ in range(700)]
    jobs += [load.post("chat", "/v1/chat/completions", chat) for _ in range(300)]
    jobs += [load.post("unauthorized", "/v1/tasks", {"query": "x"}, key="pk_not_a_key") for _ in range(200)]
    jobs += [load.post("invalid", "/v1/tasks", {"query": "", "mode": "turbo"}) for _ in range(200)]
    limited_body = {"query": "one a minute", "model": "fake-model"}
    jobs += [load.post("limited", "/v1/tasks", limited_body, key=limited) for _ in range(200)]
    jobs += [load.post("upstream500", "/v1/tasks", {"query": "#status=500", "model": "fake-model"}) for _ in range(200)]
    jobs += [
        load.post("tool", "/v1/tools/calculator/invoke", {"arguments": {"expression": "6 * 7"}}) for _ in range(100)
    ]
    jobs += [load.cancelled_stream(3) for _ in range(60)]
    jobs += [load.completed_stream() for _ in range(40)]
    try:
        results = await asyncio.gather(*jobs)
    finally:
        await load.aclose()
    assert len(load.ids) == 2000

    rows = await wait_for_rows(database_url, set(load.ids))
    assert len(rows) == 2000
    assert {row["request_id"] for row in rows} == set(load.ids)

    by_kind = Counter((load.ids[row["request_id"]], row["status"]) for row in rows)
    assert by_kind[("task", "completed")] == 700
    assert by_kind[("chat", "completed")] == 300
    assert by_kind[("unauthorized", "rejected")] == 200
    assert by_kind[("invalid", "rejected")] == 200
    assert by_kind[("limited", "completed")] == 1 and by_kind[("limited", "rejected")] == 199
    assert by_kind[("upstream500", "failed")] == 200
    assert by_kind[("tool", "completed")] == 100
    assert by_kind[("cancelled", "cancelled")] == 60
    assert by_kind[("sse", "completed")] == 40
    kinds = {row["request_id"]: row for row in rows}
    assert all(kinds[rid]["api_key_id"] is None for rid, kind in load.ids.items() if kind == "unauthorized")
    assert all(
        kinds[rid]["error_code"] == "rate_limit_exceeded" for rid in load.ids if kinds[rid]["http_status"] == 429
    )
    assert {row["error_code"] for row in rows if load.ids[row["request_id"]] == "upstream500"} == {"upstream_error"}

    # Every token the fake upstream served is in the log, cancelled streams' partial answers included.
    after = (await upstream_stats.get("/_control/stats")).json()
    assert sum(row["prompt_tokens"] for row in rows) == after["prompt_tokens"] - before["prompt_tokens"]
    assert sum(row["completion_tokens"] for row in rows) == after["completion_tokens"] - before["completion_tokens"]
    assert [r for r in results if isinstance(r, int)] == [3] * 60


async def test_a_client_leaving_mid_stream_leaves_a_cancelled_row_with_what_it_was_sent(
    audited: PacemakerServer, database_url: str
) -> None:
    load = Load(audited)
    received = await load.cancelled_stream(4)
    await load.aclose()
    [row] = await wait_for_rows(database_url, set(load.ids))
    assert row["status"] == "cancelled" and row["transport"] == "sse"
    assert row["completion_tokens"] == received == 4
    assert row["usage_estimated"] is True
    # fake-model: 1 USD per million prompt tokens, 2 per million completion tokens.
    assert row["cost_usd"] == (Decimal(row["prompt_tokens"]) * 1 + Decimal(4) * 2) / 1_000_000
    assert row["model"] == "fake-model" and row["task_id"].startswith("task_")
    assert row["ttft_ms"] is not None and row["latency_ms"] >= row["ttft_ms"]


async def test_rows_carry_who_what_and_how(audited: PacemakerServer, database_url: str) -> None:
    load = Load(audited)
    response = await load.post("task", "/v1/tasks", {"query": "What is 3 * 4?", "model": "fake-model"})
    await load.aclose()
    result = response.json()
    [row] = await wait_for_rows(database_url, set(load.ids))
    assert row["status"] == "completed" and row["http_status"] == 200
    assert row["route"] == "/v1/tasks" and row["transport"] == "json"
    assert row["task_id"] == result["id"] and row["mode"] == "simple"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        result["usage"]["prompt_tokens"],
        result["usage"]["completion_tokens"],
    )
    assert row["cost_usd"] == Decimal(response.headers["x-pacemaker-cost-usd"])
    assert row["tool_call_count"] == 1 and row["tool_names"] == "calculator"
    assert row["client_ip"] == "127.0.0.1" and row["user_agent"].startswith("python-httpx")
    assert row["prompt"] is None and row["output"] is None  # content is kept only when configured
    assert row["finished_at"] >= row["created_at"]


def _key(server: PacemakerServer, *args: str) -> str:
    key: str = json.loads(server.cli("keys", "create", "--name", uuid.uuid4().hex[:8], "--json", *args).stdout)["key"]
    return key


# --- outages, on a PostgreSQL cluster of the test's own ---------------------------------------


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    own = PostgresCluster()
    own.start()
    yield own
    own.destroy()


def outage_config(workdir: Path, cluster: PostgresCluster) -> dict[str, Any]:
    return server_config(
        workdir,
        None,
        database={"url": cluster.url},
        # The key stays known while the database is away (auth reads it once).
        auth={"key_cache_seconds": 3600},
        limits={"rpm": 1_000_000, "max_concurrency": 1000},
        audit={"spool_dir": str(workdir / "audit-spool"), "retry_interval_s": 0.2},
    )


async def send_tasks(server: PacemakerServer, count: int, prefix: str) -> set[str]:
    ids = {f"{prefix}-{n}-{uuid.uuid4().hex[:8]}" for n in range(count)}
    gate = asyncio.Semaphore(8)

    async def one(request_id: str, http: httpx.AsyncClient) -> None:
        async with gate:
            response = await http.post("/v1/tasks", json={"query": "q"}, headers={"X-Request-ID": request_id})
            assert response.status_code == 200, response.text

    async with server.client() as http:
        await asyncio.gather(*(one(request_id, http) for request_id in ids))
    return ids


async def test_rows_survive_a_database_outage_during_load(tmp_path: Path, cluster: PostgresCluster) -> None:
    server = start_pacemaker(tmp_path, outage_config(tmp_path, cluster))
    try:
        first = await send_tasks(server, 100, "before")
        await asyncio.to_thread(cluster.stop)
        during = await send_tasks(server, 150, "during")  # the hot path does not notice
        async with server.client() as http:
            for _ in range(100):  # the writer notices at its next batch (readiness words it its own way)
                if (await http.get("/health/ready")).json()["checks"]["audit"] != "ok":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("readiness never said the audit rows wait on disk")
        await asyncio.to_thread(cluster.start)
        after = await send_tasks(server, 50, "after")
        every = first | during | after
        rows = await wait_for_rows(cluster.url, every)
        assert len(rows) == len(every) == 300
        assert {row["request_id"] for row in rows} == every
        phase = {**dict.fromkeys(first, 0), **dict.fromkeys(during, 1), **dict.fromkeys(after, 2)}
        phases = [phase[row["request_id"]] for row in rows]  # in id order: the order written
        assert phases == sorted(phases)  # nothing overtakes: the outage's rows go in before later ones
    finally:
        server.process.stop()


async def test_rows_journaled_in_an_outage_arrive_after_a_crash(tmp_path: Path, cluster: PostgresCluster) -> None:
    config = outage_config(tmp_path, cluster)
    server = start_pacemaker(tmp_path, config)
    ids = await send_tasks(server, 20, "seen")  # the key is cached, the database has rows
    await wait_for_rows(cluster.url, ids)
    await asyncio.to_thread(cluster.stop)
    spooled = await send_tasks(server, 60, "spooled")
    spool = tmp_path / "audit-spool"
    await _until(lambda: _spooled_lines(spool) >= 60)
    server.process.stop(signal.SIGKILL)  # no shutdown flush: the journal must be enough

    await asyncio.to_thread(cluster.start)
    env = server.env
    restarted = ManagedProcess([*_serve_command(), "--port", str(_port(server))], env, tmp_path / "restarted.log")
    restarted.wait_for_port(_port(server))
    try:
        every = ids | spooled
        rows = await wait_for_rows(cluster.url, every)
        assert len(rows) == len(every) == 80
        assert {row["request_id"] for row in rows} == every
        await _until(lambda: _spooled_lines(spool) == 0)
    finally:
        restarted.stop()


def _spooled_lines(spool: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in spool.glob("segment-*.jsonl")) if spool.is_dir() else 0


async def _until(condition: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _serve_command() -> list[str]:
    return [sys.executable, "-m", "app.cli", "serve"]


def _port(server: PacemakerServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


async def test_a_reused_client_request_id_hides_no_request(audited: PacemakerServer, database_url: str) -> None:
    request_id = f"reused-{uuid.uuid4().hex[:8]}"
    async with audited.client() as http:
        for _ in range(3):
            response = await http.post("/v1/tasks", json={"query": "again"}, headers={"X-Request-ID": request_id})
            assert response.headers["x-request-id"] == request_id
    deadline = asyncio.get_running_loop().time() + ROWS_TIMEOUT_S
    while len(rows := await audit_rows(database_url, {request_id})) < 3:
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.2)
    assert len({row["record_uid"] for row in rows}) == 3


async def test_prune_deletes_only_rows_older_than_the_retention(audited: PacemakerServer, database_url: str) -> None:
    load = Load(audited)
    await load.post("task", "/v1/tasks", {"query": "recent"})
    await load.aclose()
    recent = await wait_for_rows(database_url, set(load.ids))
    connection = await asyncpg.connect(dsn(database_url))
    try:
        old_ids = [f"old-{uuid.uuid4().hex[:8]}" for _ in range(3)]
        for request_id in old_ids:
            await connection.execute(
                "INSERT INTO audit_record (record_uid, request_id, created_at, finished_at, route, transport, status,"
                " prompt_tokens, completion_tokens, usage_estimated, cost_usd, latency_ms, tool_call_count, retries)"
                " VALUES ($1, $2, now() - interval '40 days', now() - interval '40 days', '/v1/tasks', 'json',"
                " 'completed', 1, 1, false, 0, 1, 0, 0)",
                uuid.uuid4().hex,
                request_id,
            )
        result = await asyncio.to_thread(audited.cli, "audit", "prune", "--older-than-days", "30", "--batch-size", "2")
        assert "deleted 3 audit rows" in result.stdout
        left = {row["request_id"] for row in await connection.fetch("SELECT request_id FROM audit_record")}
    finally:
        await connection.close()
    assert not left & set(old_ids)
    assert recent[0]["request_id"] in left


async def test_an_unwritable_journal_is_reported_by_readiness_and_a_metric(tmp_path: Path) -> None:
    """The database is away and the journal's directory is a file: rows cannot be kept, and it shows."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = server_config(
        tmp_path,
        None,
        database={"url": "postgresql+asyncpg://postgres@127.0.0.1:1/none"},  # nothing listens on port 1
        audit={"spool_dir": str(blocker / "spool")},
    )
    config["auth"]["key_cache_seconds"] = 3600
    # Keys live in the database, which is away: this server authenticates nobody, but every
    # refused request is still a row to keep.
    env = pacemaker_env(tmp_path, config)
    port = free_port()
    process = ManagedProcess([*_serve_command(), "--port", str(port)], env, tmp_path / "server.log")
    process.wait_for_port(port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await http.post("/v1/tasks", json={"query": "x"}, headers={"X-Request-ID": "doomed-1"})
            # A key cannot be checked without its database: 503, not a 500.
            unchecked = await http.post("/v1/tasks", json={"query": "x"}, headers={"Authorization": "Bearer pk_x"})
            assert unchecked.status_code == 503
            assert unchecked.json()["code"] == "auth_unavailable" and unchecked.headers["retry-after"] == "1"
            ready: dict[str, Any] = {}
            for _ in range(50):
                ready = (await http.get("/health/ready")).json()
                if ready["checks"].get("audit", "").startswith("error"):
                    break
                await asyncio.sleep(0.1)
            metrics = (await http.get("/metrics")).text
        assert ready["status"] == "unavailable"
        assert ready["checks"]["audit"].startswith("error") and "NotADirectoryError" in ready["checks"]["audit"]
        assert "pacemaker_audit_spool_errors_total 2.0" in metrics  # each audited request's row
    finally:
        process.stop()
    assert "doomed-1" in process.output()  # the lost row is named in the log, never silently dropped
