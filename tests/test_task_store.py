"""The task store on SQLite and PostgreSQL: versions never go back, outages and kill -9 lose nothing, paging, leases.

Most tests run on both: a fresh SQLite file, and a database on the shared server at 127.0.0.1:5432.
The outage and freeze tests run a PostgreSQL cluster of their own, which they stop and SIGSTOP.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from app.auth.principal import KeyLimits
from app.auth.repository import ApiKeyRepository
from app.config import DatabaseSettings, TaskSettings
from app.db import create_engine, create_session_maker, migrate, session_scope
from app.durable.journal import encode
from app.errors import InvalidRequest
from app.observability.metrics import Metrics
from app.tasks.models import Task, TaskRecord, TaskToolCall
from app.tasks.store import TaskFilters, TaskStore, TaskStoreUnavailable
from tests.postgres_cluster import PostgresCluster
from tests.support import ROOT, fresh_postgres_database, run_cli

NOW = datetime.now(UTC).replace(microsecond=0)
_TABLE = Task.__table__  # type: ignore[attr-defined]


def record(task_id: str | None = None, **values: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "id": task_id or f"task_{uuid.uuid4().hex}",
        "api_key_id": 1,
        "status": "running",
        "background": False,
        "created_at": NOW,
        "query": "What is 6 * 7?",
        "instance_id": "instance-a",
        **values,
    }
    return TaskRecord(**fields)


def final(admitted: TaskRecord, **values: Any) -> TaskRecord:
    ended = {"status": "completed", "version": 2, "finished_at": NOW + timedelta(seconds=3), "lease_expires_at": None}
    return dataclasses.replace(admitted, **{**ended, "output": "42", "cost_usd": Decimal("0.000001234"), **values})


def migrated(url: str) -> str:
    # In a thread: Alembic runs its own event loop, and fixtures may be set up inside the test's.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(migrate, url).result()
    return url


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database("pacemaker_task_store") as url:
        yield migrated(url)


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return migrated(f"sqlite+aiosqlite:///{tmp_path / 'tasks.db'}")
    url: str = request.getfixturevalue("postgres_url")
    engine = create_engine(DatabaseSettings(url=url))
    async with engine.begin() as connection:
        await connection.execute(delete(_TABLE))  # the database is the module's: each test starts empty
    await engine.dispose()
    return url


@asynccontextmanager
async def opened(url: str, spool: Path, metrics: Metrics | None = None, **settings: Any) -> AsyncIterator[TaskStore]:
    engine = create_engine(DatabaseSettings(url=url))
    tuned = TaskSettings(spool_dir=spool, **{"flush_interval_s": 0.05, **settings})
    store = TaskStore(engine, tuned, metrics or Metrics())
    await store.start()
    try:
        yield store
    finally:
        await store.stop()
        await engine.dispose()


async def stored(url: str) -> dict[str, TaskRecord]:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(select(_TABLE))).mappings()
            return {row["id"]: TaskRecord.from_row(row) for row in rows}
    finally:
        await engine.dispose()


async def until(condition: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_replayed_admission_never_undoes_the_final_record(database: str, tmp_path: Path) -> None:
    first, second, third, fourth = (record(status="queued", background=True) for _ in range(4))
    metrics = Metrics()
    async with opened(database, tmp_path / "spool", metrics, flush_interval_s=30) as store:
        # In one batch, either order: the version decides, not the order of arrival.
        for one in (first, final(first), final(second), second):
            store.submit(one)
    assert await stored(database) == {first.id: final(first), second.id: final(second)}
    assert metrics.registry.get_sample_value("pacemaker_task_records_written_total") == 4
    assert metrics.registry.get_sample_value("pacemaker_audit_rows_written_total") == 0

    async with opened(database, tmp_path / "spool") as store:
        store.submit(final(third, output="first end"))
        await until(lambda: _has(store, third.id, 2))
        store.submit(third)  # a retry of the admission, after the end
        assert await store.write_now(third) is True  # the statement ran; the end stayed
        store.submit(final(third, output="second end"))  # an equal version changes nothing either
        await until(lambda: _settled(store))
        assert await store.get(third.id) == final(third, output="first end")

    # A process that died left the admission in its journal; the end is in the table meanwhile.
    async with opened(database, tmp_path / "other-spool") as store:
        assert await store.write_now(final(fourth))
    journal = tmp_path / "spool"
    (journal / f"segment-{1:020d}-1-000001.jsonl").write_bytes(encode(fourth.to_row()))
    async with opened(database, journal) as store:  # start() replays it before returning
        assert not list(journal.glob("segment-*.jsonl"))
        assert await store.get(fourth.id) == final(fourth)


async def _has(store: TaskStore, task_id: str, version: int) -> bool:
    found = await store.get(task_id)
    return found is not None and found.version == version


async def _settled(store: TaskStore) -> bool:
    return store.writer.queue_depth == 0


async def test_records_round_trip_and_unstorable_text_is_cleaned(database: str, tmp_path: Path) -> None:
    call = TaskToolCall("python", {"code": "print('\x00')"}, {"stdout": "a\x00b", "lone": "\ud800"}, None, 12.5)
    admitted = record(
        query="nul \x00 here",
        request={"context": {"k\ud800": "v"}, "max_tokens": 5},
        background=True,
        created_at=NOW.astimezone(timezone(timedelta(hours=5))),  # stored as the instant it is, in UTC
    )
    ended = final(admitted, tool_calls=(call,), output="out\x00", error_detail=None, prompt_tokens=7)
    async with opened(database, tmp_path / "spool") as store:
        assert await store.write_now(admitted)
        store.submit(ended.to_row())  # a mapping of the columns does as well as the value object
        await until(lambda: _has(store, admitted.id, 2))
        got = await store.get(admitted.id)
        with pytest.raises(ValueError, match="colour"):
            store.submit({**admitted.to_row(), "colour": "red"})
        with pytest.raises(ValueError, match="needs query"):
            store.submit({key: value for key, value in admitted.to_row().items() if key != "query"})
        assert await store.get("task_unknown") is None
    assert got is not None and got.query == "nul \ufffd here" and got.output == "out\ufffd"
    assert got.request == {"context": {"k\ufffd": "v"}, "max_tokens": 5}
    assert got.tool_calls == (
        TaskToolCall("python", {"code": "print('\ufffd')"}, {"stdout": "a\ufffdb", "lone": "\ufffd"}, None, 12.5),
    )
    assert got.cost_usd == Decimal("0.000001234") and got.prompt_tokens == 7
    assert got.created_at == NOW and got.created_at.tzinfo is UTC
    assert got.finished_at == NOW + timedelta(seconds=3) and got.started_at is None


async def test_a_record_the_database_refuses_is_dead_lettered_and_the_others_written(
    tmp_path: Path, postgres_url: str
) -> None:
    good, bad = record(), record(api_key_id=2**31)  # beyond PostgreSQL's INTEGER
    async with opened(postgres_url, tmp_path / "spool") as store:
        store.submit(bad)
        store.submit(good)
        await until(lambda: _has(store, good.id, 1))
        await until(lambda: _settled(store))
    assert store.writer.dead_lettered == 1 and store.writer.last_dead_letter is not None
    assert store.writer.last_dead_letter.startswith(f"task {bad.id}: ")
    [letters] = (tmp_path / "spool-dead-letter").glob("dead-letter-*.jsonl")
    assert json.loads(letters.read_text())["row"]["id"] == bad.id


_SUBMIT_AND_WAIT = """
import asyncio, sys, time
from pathlib import Path
from app.config import DatabaseSettings, TaskSettings
from app.db import create_engine
from app.durable.journal import RowCodec
from app.observability.metrics import Metrics
from app.tasks.models import Task, TaskRecord
from app.tasks.store import TaskStore

async def main() -> None:
    url, spool, lines = sys.argv[1], Path(sys.argv[2]), sys.stdin.read().splitlines()
    # Nothing is written before the batch is full or a minute has passed: the kill comes first.
    settings = TaskSettings(spool_dir=spool, flush_interval_s=60, batch_size=1000)
    store = TaskStore(create_engine(DatabaseSettings(url=url)), settings, Metrics())
    await store.start()
    codec = RowCodec.of(Task.__table__)
    for line in lines:
        store.submit(TaskRecord.from_row(codec.decode(line.encode())))
    print("submitted", flush=True)
    time.sleep(60)

asyncio.run(main())
"""


async def test_a_kill_9_before_the_write_loses_no_record(database: str, tmp_path: Path) -> None:
    records = [record(f"task_killed_{n}", created_at=NOW + timedelta(seconds=n)) for n in range(20)]
    records += [final(records[0])]
    spool = tmp_path / "spool"
    process = subprocess.Popen(
        [sys.executable, "-c", _SUBMIT_AND_WAIT, database, str(spool)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("".join(encode(one.to_row()).decode() for one in records))
    process.stdin.close()
    try:
        assert await asyncio.to_thread(process.stdout.readline) == "submitted\n"
    finally:
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait)
        process.stdout.close()
    assert await stored(database) == {}  # killed before the write
    async with opened(database, spool) as store:
        found = await stored(database)  # start() has returned: replayed already
        assert store.writer.queue_depth == 0
    assert found == {one.id: one for one in [final(records[0]), *records[1:20]]}


async def test_pages_return_every_record_once_newest_first_and_filter(database: str, tmp_path: Path) -> None:
    records = [
        record(
            f"task_{n:03d}",
            api_key_id=1 + n % 2,
            status="completed" if n % 3 else "failed",
            created_at=NOW - timedelta(minutes=n // 2),  # pairs share a created_at: the id orders them
        )
        for n in range(30)
    ]
    newest_first = sorted(records, key=lambda one: (one.created_at, one.id), reverse=True)
    async with opened(database, tmp_path / "spool") as store:
        for one in records:
            assert await store.write_now(one)
        seen: list[TaskRecord] = []
        page = await store.page(TaskFilters(), None, 4)
        while True:
            seen += page.records
            # Arrivals meanwhile, newer and older, neither repeat nor hide a record that was there.
            for moment in (NOW + timedelta(minutes=1), NOW - timedelta(days=1)):
                assert await store.write_now(record(f"task_new_{uuid.uuid4().hex}", api_key_id=3, created_at=moment))
            if page.next_cursor is None:
                break
            page = await store.page(TaskFilters(), page.next_cursor, 4)
        assert [one.id for one in seen if not one.id.startswith("task_new_")] == [one.id for one in newest_first]
        assert len(seen) == len({one.id for one in seen})

        async def ids(filters: TaskFilters, limit: int = 100) -> list[str]:
            return [one.id for one in (await store.page(filters, None, limit)).records]

        assert await ids(TaskFilters(api_key_id=2, status="failed")) == [
            one.id for one in newest_first if one.api_key_id == 2 and one.status == "failed"
        ]
        since, until_ = NOW - timedelta(minutes=5), NOW - timedelta(minutes=2)
        offset = timezone(timedelta(hours=5))  # the same instants, written in another zone
        assert await ids(TaskFilters(since=since.astimezone(offset), until=until_.astimezone(offset))) == [
            one.id for one in newest_first if since <= one.created_at < until_
        ]
        last = await store.page(TaskFilters(api_key_id=1), None, 15)
        assert len(last.records) == 15 and last.next_cursor is None  # exactly one page: no empty page after it
        for bad in ("not base64!", "t:1:", "id:12", "t:-1:task_1", "t:1:task\x00", "t:" + "9" * 19 + ":task_1"):
            with pytest.raises(InvalidRequest, match="cursor"):
                await store.page(TaskFilters(), base64.urlsafe_b64encode(bad.encode()).decode(), 4)


async def test_active_background_tasks_are_counted_per_key(database: str, tmp_path: Path) -> None:
    tasks = [
        record(background=True),
        record(background=True, status="queued"),
        record(background=True, status="completed", version=2),
        record(background=False),
        record(background=True, api_key_id=2),
    ]
    async with opened(database, tmp_path / "spool") as store:
        for one in tasks:
            assert await store.write_now(one)
        assert [await store.count_active_background(key) for key in (1, 2, 3)] == [2, 1, 0]
        await store.write_now(final(tasks[0]))
        assert await store.count_active_background(1) == 1


async def test_two_sweepers_claim_each_expired_task_exactly_once(database: str, tmp_path: Path) -> None:
    expired = [
        record(background=True, status="queued" if n % 4 else "running", lease_expires_at=NOW - timedelta(seconds=60))
        for n in range(118)
    ]
    # Plain tasks hold leases too: one whose instance died is ended by the sweep as well.
    expired += [record(background=False, lease_expires_at=NOW - timedelta(seconds=60)) for _ in range(2)]
    renewed = [record(background=True, lease_expires_at=NOW - timedelta(seconds=60)) for _ in range(5)]
    kept = [
        record(background=True, lease_expires_at=NOW + timedelta(seconds=30)),  # alive
        record(background=True, lease_expires_at=NOW - timedelta(seconds=2)),  # within the grace
        record(background=False, lease_expires_at=None),  # no lease at all
        final(record(background=True, lease_expires_at=NOW - timedelta(seconds=60))),  # ended
    ]
    async with opened(database, tmp_path / "a") as first, opened(database, tmp_path / "b") as second:
        for one in [*expired, *renewed, *kept]:
            assert await first.write_now(one)
        assert await first.renew_leases([one.id for one in renewed], NOW + timedelta(seconds=30)) == {
            one.id for one in renewed
        }
        claims: dict[str, list[str]] = {"first": [], "second": []}
        assert await second.get("task_none") is None  # both pools hold a connection: neither starts late

        async def sweep(name: str, store: TaskStore) -> None:
            while claimed := await store.claim_expired(NOW, timedelta(seconds=5), limit=3):
                assert len(claimed) <= 3  # a sweep takes what it asked for, never more
                claims[name] += [one.id for one in claimed]
                assert all(one.status == "failed" and one.error_code == "worker_lost" for one in claimed)

        await asyncio.gather(sweep("first", first), sweep("second", second))
        every = claims["first"] + claims["second"]
        assert sorted(every) == sorted(one.id for one in expired)  # each once, and only these
        assert claims["first"] and claims["second"]  # both took part
        # The instance that lost them finds out at its next renewal, and its late end changes nothing.
        assert await second.renew_leases([expired[0].id, renewed[0].id], NOW + timedelta(seconds=60)) == {renewed[0].id}
        assert await second.write_now(final(expired[0]))
        lost = await second.get(expired[0].id)
    assert lost is not None and (lost.status, lost.version, lost.finished_at) == ("failed", 2, NOW)
    assert lost.lease_expires_at is None and lost.instance_id == "instance-a"
    statuses = {task_id: one.status for task_id, one in (await stored(database)).items()}
    assert all(statuses[one.id] == "running" for one in renewed) and statuses[kept[0].id] == "running"


async def test_prune_deletes_old_records_but_never_an_active_background_task(database: str, tmp_path: Path) -> None:
    old = NOW - timedelta(days=40)
    gone = [final(record(created_at=old)) for _ in range(5)] + [record(created_at=old)]  # a plain task left running
    running = record(created_at=old, background=True, lease_expires_at=NOW + timedelta(seconds=30))
    recent = record()
    async with opened(database, tmp_path / "spool") as store:
        for one in [*gone, running, recent]:
            assert await store.write_now(one)
        assert await store.prune(NOW - timedelta(days=30), batch_size=2) == 6
    assert set(await stored(database)) == {running.id, recent.id}

    older = [final(record(created_at=old)) for _ in range(3)]
    async with opened(database, tmp_path / "spool") as store:
        for one in older:
            assert await store.write_now(one)
    env = {"PACEMAKER_DATABASE__URL": database, "PATH": "/usr/bin:/bin"}
    result = await asyncio.to_thread(run_cli, env, "tasks", "prune", "--older-than-days", "30", "--batch-size", "2")
    assert result.stdout.startswith("deleted 3 task records created before ")
    assert set(await stored(database)) == {running.id, recent.id}


async def test_keys_take_a_limit_on_background_tasks(tmp_path: Path) -> None:
    url = migrated(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    env = {"PACEMAKER_DATABASE__URL": url, "PATH": "/usr/bin:/bin"}
    created = await asyncio.to_thread(
        run_cli, env, "keys", "create", "--name", "bg", "--json", "--max-background-tasks", "3"
    )
    refused = await asyncio.to_thread(
        run_cli, env, "keys", "create", "--name", "x", "--max-background-tasks", "0", check=False
    )
    assert refused.returncode == 2 and "max-background-tasks" in refused.stderr
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with session_scope(create_session_maker(engine)) as session:
            [key] = await ApiKeyRepository(session).list()
    finally:
        await engine.dispose()
    assert key.id == json.loads(created.stdout)["id"]
    assert KeyLimits.of(key).max_background_tasks == 3 and KeyLimits().max_background_tasks is None


# --- outages, on a PostgreSQL cluster of the test's own ---------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    own = PostgresCluster()
    own.start()
    migrated(own.url)
    yield own
    own.destroy()


async def test_an_outage_keeps_the_final_record_and_writes_it_when_the_database_returns(
    tmp_path: Path, cluster: PostgresCluster
) -> None:
    admitted, during = record(background=True), record(background=True)
    async with opened(cluster.url, tmp_path / "spool", retry_interval_s=0.2, read_timeout_s=1) as store:
        assert await store.write_now(admitted)
        await asyncio.to_thread(cluster.stop)
        try:
            store.submit(final(admitted))  # never waits, whatever the database does
            assert await store.write_now(during, timeout_s=1) is False  # kept for the writer instead
            with pytest.raises(TaskStoreUnavailable):
                await store.get(admitted.id)
            await until(lambda: _false(store.writer.database_ok))
            assert store.writer.queue_depth == 2 and store.writer.spool_error is None
        finally:
            await asyncio.to_thread(cluster.start)
        await until(lambda: _settled(store))
        assert await store.get(admitted.id) == final(admitted)
        assert await store.get(during.id) == during
        assert store.writer.database_ok


async def _false(value: bool) -> bool:
    return not value


async def test_reads_and_write_now_answer_in_time_on_a_frozen_database(
    tmp_path: Path, cluster: PostgresCluster
) -> None:
    admitted = record(background=True)
    async with opened(cluster.url, tmp_path / "spool", read_timeout_s=0.5, write_timeout_s=1) as store:
        assert await store.get(admitted.id) is None  # a pooled connection, open before the freeze
        cluster.freeze()
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            assert await store.write_now(admitted, timeout_s=0.5) is False
            assert loop.time() - started < 1.5
            started = loop.time()
            with pytest.raises(TaskStoreUnavailable, match=r"did not answer within 0\.5 s"):
                await store.count_active_background(1)
            assert loop.time() - started < 1.5
        finally:
            cluster.thaw()
        await until(lambda: _has(store, admitted.id, 1))  # the writer had it, and wrote it once it could
