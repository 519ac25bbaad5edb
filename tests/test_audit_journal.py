"""The audit journal and sink in-process, on SQLite: replay at start, pending cost, memory overflow, storable text."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.context import AuditContext
from app.audit.journal import Journal, decode, encode
from app.audit.models import AuditRecord
from app.audit.sink import AuditSink
from app.audit.storable import REPLACEMENT, storable
from app.config import AuditSettings, DatabaseSettings
from app.db import create_engine
from app.observability.metrics import Metrics
from tests.support import ROOT


def row(request_id: str, *, key: int | None = None, cost: str = "0") -> dict[str, Any]:
    context = AuditContext(request_id=request_id, route="/v1/tasks", transport="json", api_key_id=key)
    context.cost_usd = Decimal(cost)
    return context.row()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"))
    async with engine.begin() as connection:
        await connection.run_sync(AuditRecord.__table__.create)  # type: ignore[attr-defined]
    yield engine
    await engine.dispose()


async def request_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return [r[0] for r in await connection.execute(text("SELECT request_id FROM audit_record ORDER BY id"))]


def settings(tmp_path: Path, **overrides: Any) -> AuditSettings:
    return AuditSettings(**{"spool_dir": tmp_path / "journal", "flush_interval_s": 0.05, **overrides})


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) until condition() (or the coroutine it returns) is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_rows_come_back_exactly_as_they_were_journaled(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    original = row("a", key=3, cost="0.000000123")
    segment, end = journal.append(encode(original))
    journal.append(encode(row("b")))
    lines = journal.read(segment, 10)
    assert [line.row["request_id"] for line in lines if line.row] == ["a", "b"]
    assert lines[0].end == end and lines[0].row == decode(encode(original)) == original
    assert isinstance(lines[0].row["cost_usd"], Decimal) and isinstance(lines[0].row["created_at"], datetime)


_WRITE_AND_WAIT = """
import sys, time
from pathlib import Path
from app.audit.journal import Journal
Journal(Path(sys.argv[1])).append(b'{"request_id": "%s"}\\n' % sys.argv[2].encode())
print("written", flush=True)
if sys.argv[2] == "live":
    time.sleep(60)
"""


def test_a_living_process_keeps_its_segments_and_a_dead_ones_are_claimed(tmp_path: Path) -> None:
    def writer(name: str) -> subprocess.Popen[str]:
        args = [sys.executable, "-c", _WRITE_AND_WAIT, str(tmp_path), name]
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline() == "written\n"
        return process

    dead = writer("dead")
    dead.wait()  # killed or exited, its flock is gone with it
    live = writer("live")
    for process in (dead, live):
        assert process.stdout is not None
        process.stdout.close()
    try:
        journal = Journal(tmp_path)
        journal.append(b'{"request_id": "mine"}\n')
        [leftover] = journal.leftovers()  # the dead one's, renamed as ours
        assert f"-{journal.owner}-" in leftover.name
        segment = journal.open_claimed(leftover)
        assert [line.raw for line in journal.read(segment, 10)] == [b'{"request_id": "dead"}\n']
        assert Journal(tmp_path).leftovers() == []  # another process finds every owner alive, us included
        assert len(list(tmp_path.glob("owner-*.lock"))) == 2  # the dead one's lock is gone with its segments
    finally:
        live.kill()
        live.wait()


def test_a_torn_last_line_of_a_crashed_process_is_skipped(tmp_path: Path) -> None:
    (tmp_path / f"segment-{1:020d}-1-000001.jsonl").write_bytes(encode(row("whole")) + b'{"request_id": "to')
    journal = Journal(tmp_path)
    segment = journal.open_claimed(journal.leftovers()[0])
    [whole] = journal.read(segment, 10)
    assert whole.row is not None and whole.row["request_id"] == "whole"
    segment.committed = whole.end
    [torn] = journal.read(segment, 10)
    assert torn.row is None and torn.raw == b"" and torn.end == segment.written
    segment.committed = torn.end
    assert journal.read(segment, 10) == []


def test_text_is_made_storable_by_the_tables_own_limits() -> None:
    clean = row("ok")
    route = clean["route"]
    assert storable(clean)["route"] is route  # ASCII within its limit: untouched
    bad = row("x" * 500)
    bad.update(route="/v1/\x00" + "r" * 300, user_agent="agent\udc80", tool_names=None, prompt="a\x00b")
    fixed = storable(bad)
    assert fixed["route"] == "/v1/" + REPLACEMENT + "r" * 115  # 120 characters: the column's max_length
    assert len(fixed["request_id"]) == 160
    assert fixed["user_agent"] == "agent" + REPLACEMENT
    assert fixed["prompt"] == "a" + REPLACEMENT + "b"  # Text: no limit, but no NUL either
    assert encode(fixed)  # and JSON can carry it now (a lone surrogate made orjson refuse)


async def test_start_replays_what_a_dead_process_left_before_it_returns(tmp_path: Path, engine: AsyncEngine) -> None:
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    left = [row(f"left-{n}") for n in range(3)]
    (journal_dir / f"segment-{1:020d}-1-000001.jsonl").write_bytes(b"".join(encode(r) for r in left))
    sink = AuditSink(engine, settings(tmp_path), Metrics())
    await sink.start()
    try:
        assert await request_ids(engine) == ["left-0", "left-1", "left-2"]  # already, before any wait
        assert not list(journal_dir.glob("segment-*.jsonl"))
    finally:
        await sink.stop()


async def test_pending_cost_counts_rows_until_they_are_committed(tmp_path: Path, engine: AsyncEngine) -> None:
    sink = AuditSink(engine, settings(tmp_path, flush_interval_s=30), Metrics())
    await sink.start()
    try:
        sink.submit(row("a", key=7, cost="0.25"))
        sink.submit(row("b", key=7, cost="0.000000001"))
        sink.submit(row("c", key=8, cost="1"))
        sink.submit(row("d", key=None, cost="5"))
        assert sink.pending_cost(7) == Decimal("0.250000001")
        assert sink.pending_cost(8) == Decimal(1) and sink.pending_cost(9) == 0
    finally:
        await sink.stop()  # writes them to the database, not just to disk
    assert sorted(await request_ids(engine)) == ["a", "b", "c", "d"]
    assert sink.pending_cost(7) == 0 and sink.pending_cost(8) == 0
    assert not list((tmp_path / "journal").iterdir())  # segments and owner lock gone: nothing to replay


async def test_rows_beyond_the_queue_are_read_back_from_the_journal_in_order(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    metrics = Metrics()
    sink = AuditSink(engine, settings(tmp_path, queue_size=10, batch_size=7), metrics)
    await sink.start()
    try:
        ids = [f"r{n:03d}" for n in range(200)]
        for number, request_id in enumerate(ids):
            sink.submit(row(request_id, key=1, cost="0.5"))
            if number % 50 == 0:
                await asyncio.sleep(0)  # the writer runs now and then, as it would among requests
        assert sink.pending_cost(1) == Decimal(100)

        async def all_in() -> bool:
            return len(await request_ids(engine)) >= len(ids)

        await until(all_in)
        assert await request_ids(engine) == ids  # every row once, in the order submitted
        assert sink.pending_cost(1) == 0 and sink.queue_depth == 0
        assert (metrics.registry.get_sample_value("pacemaker_audit_rows_spooled_total") or 0) > 100
        assert (metrics.registry.get_sample_value("pacemaker_audit_rows_replayed_total") or 0) > 100
    finally:
        await sink.stop()
    assert not list((tmp_path / "journal").glob("segment-*.jsonl"))  # all in: nothing left on disk


async def test_submit_never_fsyncs_and_the_writer_does_in_a_thread(
    tmp_path: Path, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        threads.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    sink = AuditSink(engine, settings(tmp_path), Metrics())
    await sink.start()
    try:
        for n in range(50):
            sink.submit(row(f"s{n}"))
        assert threads == []
        await asyncio.sleep(0.3)
        assert threads and threading.main_thread().name not in threads
    finally:
        await sink.stop()


async def test_rows_the_journal_cannot_take_still_reach_the_database(
    tmp_path: Path, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    metrics = Metrics()
    sink = AuditSink(engine, AuditSettings(spool_dir=blocker / "journal", flush_interval_s=0.05), metrics)
    await sink.start()
    try:
        sink.submit(row("unjournaled-1"))
        sink.submit(row("unjournaled-2"))
        assert sink.spool_error is not None and "NotADirectoryError" in sink.spool_error
        assert metrics.registry.get_sample_value("pacemaker_audit_spool_errors_total") == 2

        async def in_database() -> bool:
            return len(await request_ids(engine)) == 2

        await until(in_database)
    finally:
        await sink.stop()
    assert "unjournaled-1" in caplog.text and "unjournaled-2" in caplog.text  # named while at risk


async def test_a_row_sqlite_cannot_store_is_dead_lettered_and_the_others_are_written(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    metrics = Metrics()
    sink = AuditSink(engine, settings(tmp_path), metrics)
    await sink.start()
    try:
        bad = row("too-big")
        bad["prompt_tokens"] = 2**70  # beyond SQLite's 64-bit integers (and JSON's: memory only)
        for request_id in ("good-1", "good-2"):
            sink.submit(row(request_id))
        sink.submit(bad)
        sink.submit(row("good-3"))

        async def three() -> bool:
            return len(await request_ids(engine)) == 3

        await until(three)
        await until(lambda: sink.queue_depth == 0)
    finally:
        await sink.stop()
    assert await request_ids(engine) == ["good-1", "good-2", "good-3"]
    assert sink.dead_lettered == 1 and sink.last_dead_letter is not None
    assert sink.last_dead_letter.startswith("request too-big: OverflowError")
    [letters] = (tmp_path / "journal-dead-letter").glob("dead-letter-*.jsonl")
    assert "too-big" in letters.read_text() and "OverflowError" in letters.read_text()
    assert metrics.registry.get_sample_value("pacemaker_audit_rows_dead_lettered_total") == 1


async def test_start_does_not_wait_long_for_a_database_that_does_not_answer(tmp_path: Path) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts, never answers: a database behind a dead network path

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    (journal_dir / f"segment-{1:020d}-1-000001.jsonl").write_bytes(encode(row("waits")))
    engine = create_engine(DatabaseSettings(url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none"))
    sink = AuditSink(
        engine, settings(tmp_path, startup_replay_timeout_s=0.5, write_timeout_s=30, shutdown_timeout_s=0.5), Metrics()
    )
    started = asyncio.get_running_loop().time()
    try:
        await sink.start()
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        await sink.stop()
        await engine.dispose()
        for writer in accepted:
            writer.close()
        listener.close()
        await listener.wait_closed()
    [left] = journal_dir.glob("segment-*.jsonl")  # still on disk, for the next start
    assert b'"waits"' in left.read_bytes()
