"""One row PostgreSQL refuses never stops the audit log: text is made storable, and what still fails is dead-lettered.

Each test runs on a fresh database on the shared server at 127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.audit.context import AuditContext
from app.audit.journal import encode
from app.audit.sink import AuditSink
from app.config import AuditSettings, DatabaseSettings
from app.db import create_engine, migrate
from app.durable.dead_letter import row_fault
from app.observability.metrics import Metrics
from tests.support import fresh_postgres_database, server_config, start_pacemaker

ARRIVAL_TIMEOUT_S = 10.0


@pytest.fixture
def database_url() -> Iterator[str]:
    with fresh_postgres_database("pacemaker_audit_dead_letter") as url:
        yield url


async def rows_by_request(url: str) -> dict[str, list[dict[str, Any]]]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        records = await connection.fetch("SELECT * FROM audit_record ORDER BY id")
    finally:
        await connection.close()
    found: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        found.setdefault(record["request_id"], []).append(dict(record))
    return found


async def wait_for(url: str, request_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    deadline = asyncio.get_running_loop().time() + ARRIVAL_TIMEOUT_S
    while True:
        found = await rows_by_request(url)
        if request_ids <= found.keys() or asyncio.get_running_loop().time() > deadline:
            return {request_id: rows for request_id, rows in found.items() if request_id in request_ids}
        await asyncio.sleep(0.1)


async def test_a_nul_in_a_path_does_not_stop_the_rows_after_it(tmp_path: Path, database_url: str) -> None:
    server = start_pacemaker(tmp_path, server_config(tmp_path, None, database={"url": database_url}))
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as anonymous:
            refused = await anonymous.get("/v1/%00", headers={"X-Request-ID": "nul-path"})
        assert refused.status_code in (401, 404)
        ids = {f"after-nul-{n}-{uuid.uuid4().hex[:6]}" for n in range(100)}
        gate = asyncio.Semaphore(8)
        async with server.client() as http:

            async def one(request_id: str) -> None:
                async with gate:
                    response = await http.post("/v1/tasks", json={"query": "q"}, headers={"X-Request-ID": request_id})
                    assert response.status_code == 200, response.text

            await asyncio.gather(*(one(request_id) for request_id in ids))
        found = await wait_for(database_url, ids | {"nul-path"})
    finally:
        server.process.stop()
    assert len(found) == 101 and all(len(rows) == 1 for rows in found.values())
    [nul] = found["nul-path"]
    assert nul["route"] == "/v1/\ufffd" and nul["status"] == "rejected"


@pytest.fixture
async def sink_database(database_url: str) -> str:
    await asyncio.to_thread(migrate, database_url)
    return database_url


def row(request_id: str, **values: Any) -> dict[str, Any]:
    context = AuditContext(request_id=request_id, route="/v1/tasks", transport="json")
    context.cost_usd = Decimal("0.000001")
    return {**context.row(), **values}


async def test_a_row_postgres_refuses_is_dead_lettered_and_every_other_row_written(
    tmp_path: Path, sink_database: str
) -> None:
    engine = create_engine(DatabaseSettings(url=sink_database))
    metrics = Metrics()
    sink = AuditSink(engine, AuditSettings(spool_dir=tmp_path / "journal", flush_interval_s=0.05), metrics)
    await sink.start()
    try:
        before = [f"good-{n}" for n in range(40)]
        after = [f"later-{n}" for n in range(40)]
        for request_id in before[:20]:
            sink.submit(row(request_id))
        # Storable text, but an api_key_id beyond the INTEGER column: no cleaning can save it.
        sink.submit(row("out-of-range", api_key_id=2**31, route="/v1/tasks"))
        for request_id in before[20:]:
            sink.submit(row(request_id))
        found = await wait_for(sink_database, set(before))
        assert sorted(found) == sorted(before)
        assert sink.dead_lettered == 1 and sink.last_dead_letter is not None
        assert sink.last_dead_letter.startswith("request out-of-range: ") and "int32" in sink.last_dead_letter
        assert metrics.registry.get_sample_value("pacemaker_audit_rows_dead_lettered_total") == 1
        for request_id in after:  # and later batches flow
            sink.submit(row(request_id))
        assert sorted(await wait_for(sink_database, set(after))) == sorted(after)
    finally:
        await sink.stop()
        await engine.dispose()
    assert "out-of-range" not in await rows_by_request(sink_database)
    [letter_file] = (tmp_path / "journal-dead-letter").glob("dead-letter-*.jsonl")
    [letter] = [json.loads(line) for line in letter_file.read_text().splitlines()]
    assert letter["row"]["request_id"] == "out-of-range" and letter["row"]["api_key_id"] == 2**31
    assert "int32" in letter["reason"]
    assert not list((tmp_path / "journal").glob("segment-*.jsonl"))  # nothing waits on disk


async def test_rows_an_old_journal_holds_are_cleaned_or_dead_lettered_at_start(
    tmp_path: Path, sink_database: str
) -> None:
    """A segment left by a process that is gone (an older version's, with a NUL unreplaced) is replayed by start()."""
    journal = tmp_path / "journal"
    journal.mkdir()
    left = [row("left-1"), row("left-nul", route="/v1/\x00"), row("left-bad", http_status=2**40), row("left-2")]
    (journal / f"segment-{1:020d}-1-000001.jsonl").write_bytes(b"".join(encode(r) for r in left))
    engine = create_engine(DatabaseSettings(url=sink_database))
    sink = AuditSink(engine, AuditSettings(spool_dir=journal), Metrics())
    await sink.start()
    try:
        found = await rows_by_request(sink_database)  # start() has returned: replayed already
    finally:
        await sink.stop()
        await engine.dispose()
    assert sorted(found) == ["left-1", "left-2", "left-nul"]
    assert found["left-nul"][0]["route"] == "/v1/\ufffd"
    assert sink.dead_lettered == 1 and sink.last_dead_letter is not None
    assert sink.last_dead_letter.startswith("request left-bad: ")
    assert not list(journal.glob("segment-*.jsonl"))


class DriverError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def wrapped(cause: BaseException) -> Exception:
    """As SQLAlchemy raises it: its own error, the driver's as the cause."""
    error = RuntimeError("(driver error)")
    error.__cause__ = cause
    return error


def test_only_what_the_rows_hold_counts_as_their_fault() -> None:
    for state in ("22001", "22021", "22003", "23502"):  # too long, bad byte, out of range, not null
        assert row_fault(wrapped(DriverError(state))) == f"DriverError: sqlstate {state}"
    for state in ("08006", "57P01", "53100", "40001", "42P01", "42501"):  # connection, shutdown, disk, ..., schema
        assert row_fault(wrapped(DriverError(state))) is None
    assert row_fault(wrapped(OverflowError("int too large"))) == "OverflowError: int too large"
    assert row_fault(ConnectionRefusedError(111, "refused")) is None
    assert row_fault(TimeoutError()) is None


async def test_readiness_reports_dead_lettered_rows_and_still_serves(tmp_path: Path, database_url: str) -> None:
    """A row set aside is the operator's to look at: readiness names it, and stays 200."""
    config = server_config(tmp_path, None, database={"url": database_url})
    journal = Path(config["audit"]["spool_dir"])
    journal.mkdir(parents=True)
    left = [row("left-good"), row("left-bad", http_status=2**40)]
    (journal / f"segment-{1:020d}-1-000001.jsonl").write_bytes(b"".join(encode(r) for r in left))
    server = start_pacemaker(tmp_path, config)
    try:
        async with server.client() as http:
            ready = await http.get("/health/ready")
    finally:
        server.process.stop()
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["audit_dead_letters"].startswith("1 rows set aside; last: request left-bad: ")
