"""API keys: the CLI, hashed storage, revocation and the lookup cache."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth.authenticator import Authenticator
from app.auth.keys import hash_key
from app.auth.repository import ApiKeyRepository
from app.config import DatabaseSettings
from app.db import create_engine, create_session_maker, migrate, session_scope
from app.errors import Unauthenticated
from tests.postgres_cluster import PostgresCluster
from tests.support import (
    PacemakerServer,
    fresh_postgres_database,
    pacemaker_env,
    run_cli,
    server_config,
    start_pacemaker,
)


@pytest.fixture(scope="module")
def uncached_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacemakerServer]:
    """A server that asks the database on every request (key_cache_seconds: 0)."""
    workdir = tmp_path_factory.mktemp("auth")
    server = start_pacemaker(workdir, server_config(workdir, None, auth={"key_cache_seconds": 0}))
    yield server
    server.process.stop()


def db_path(server: PacemakerServer) -> Path:
    return server.workdir / "pacemaker.db"


async def test_cli_creates_lists_and_revokes_keys(uncached_server: PacemakerServer) -> None:
    created = json.loads(uncached_server.cli("keys", "create", "--name", "ci-bot", "--json").stdout)
    assert created["key"].startswith("pk_") and created["prefix"] == created["key"][:10]

    listing = uncached_server.cli("keys", "list").stdout
    assert "ci-bot" in listing and created["prefix"] in listing
    assert created["key"] not in listing

    async with uncached_server.client(key=created["key"]) as http:
        assert (await http.post("/v1/tasks", json={"query": "hello"})).status_code == 200
        revoked = uncached_server.cli("keys", "revoke", created["prefix"])
        assert "revoked" in revoked.stdout
        after = await http.post("/v1/tasks", json={"query": "hello again"})
    assert after.status_code == 401
    assert "ci-bot" not in uncached_server.cli("keys", "list").stdout
    assert "revoked" in uncached_server.cli("keys", "list", "--all").stdout
    again = uncached_server.cli("keys", "revoke", created["prefix"], check=False)
    assert again.returncode == 1


def test_only_a_hash_of_each_key_is_stored(uncached_server: PacemakerServer) -> None:
    created = json.loads(uncached_server.cli("keys", "create", "--name", "hashed", "--json").stdout)
    with sqlite3.connect(db_path(uncached_server)) as connection:
        rows = connection.execute("SELECT * FROM api_key").fetchall()
        stored = " ".join(str(value) for row in rows for value in row)
        [(key_hash,)] = connection.execute("SELECT key_hash FROM api_key WHERE name = 'hashed'").fetchall()
    assert created["key"] not in stored
    assert key_hash == hash_key(created["key"])


def test_dev_key_is_created_once_and_printed_with_a_curl_line(tmp_path: Path) -> None:
    env = pacemaker_env(tmp_path, server_config(tmp_path, None))
    run_cli(env, "migrate")
    first = run_cli(env, "dev-key").stdout
    second = run_cli(env, "dev-key").stdout
    key = (tmp_path / "dev-key").read_text().strip()
    assert key in first and key in second
    assert "curl" in first and "Authorization: Bearer" in first
    assert oct((tmp_path / "dev-key").stat().st_mode & 0o777) == "0o600"
    assert run_cli(env, "keys", "list").stdout.count("development") == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def migrated_sqlite(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
    migrate(url)  # synchronous (Alembic runs its own loop), so outside the test's loop
    return url


async def test_authenticator_caches_hits_and_misses_for_their_ttl(migrated_sqlite: str) -> None:
    url = migrated_sqlite
    engine = create_engine(DatabaseSettings(url=url))
    session_maker = create_session_maker(engine)
    clock = FakeClock()
    authenticator = Authenticator(session_maker, cache_seconds=10, cache_size=2, clock=clock)
    try:
        async with session_scope(session_maker) as session:
            row, key = await ApiKeyRepository(session).create("cached")
        principal = await authenticator.authenticate(key)
        assert principal.name == "cached" and principal.key_id == row.id

        async with session_scope(session_maker) as session:
            await ApiKeyRepository(session).revoke(str(row.id))
        assert (await authenticator.authenticate(key)).name == "cached"  # still cached
        clock.now += 10.5
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(key)  # expired: the database says revoked

        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(None)
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate("")
    finally:
        await engine.dispose()


async def test_authenticator_cache_is_bounded(migrated_sqlite: str) -> None:
    url = migrated_sqlite
    engine = create_engine(DatabaseSettings(url=url))
    authenticator = Authenticator(create_session_maker(engine), cache_seconds=10, cache_size=3)
    try:
        for n in range(20):
            with pytest.raises(Unauthenticated):
                await authenticator.authenticate(f"pk_bogus_{n}")
        assert len(authenticator._cache) == 3
    finally:
        await engine.dispose()


async def test_keys_work_against_postgresql(tmp_path: Path) -> None:
    """The whole path (migrate, create a key, authenticate a request) on PostgreSQL."""
    with fresh_postgres_database("pacemaker_auth") as url:
        server = start_pacemaker(tmp_path, server_config(tmp_path, None, database={"url": url}))
        try:
            async with server.client() as http:
                assert (await http.post("/v1/tasks", json={"query": "on postgres"})).status_code == 200
                assert (await http.get("/health/ready")).json()["checks"]["database"] == "ok"
            async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
                assert (await anonymous.post("/v1/tasks", json={"query": "x"})).status_code == 401
        finally:
            server.process.stop()


async def test_many_requests_missing_the_cache_at_once_read_the_database_once(migrated_sqlite: str) -> None:
    engine = create_engine(DatabaseSettings(url=migrated_sqlite))
    session_maker = create_session_maker(engine)
    authenticator = Authenticator(session_maker, cache_seconds=10, cache_size=10)
    try:
        async with session_scope(session_maker) as session:
            _row, key = await ApiKeyRepository(session).create("busy")
        loads = 0
        original = authenticator._load

        async def counting(key_hash: str) -> Any:
            nonlocal loads
            loads += 1
            return await original(key_hash)

        authenticator._load = counting  # type: ignore[method-assign]
        principals = await asyncio.gather(*(authenticator.authenticate(key) for _ in range(50)))
        assert {p.name for p in principals} == {"busy"}
        assert loads == 1
    finally:
        await engine.dispose()


async def test_a_flood_of_one_bad_key_reads_the_database_once(migrated_sqlite: str) -> None:
    """Unknown keys are cached negatively: guessing does not cost a database read per request."""
    engine = create_engine(DatabaseSettings(url=migrated_sqlite))
    authenticator = Authenticator(create_session_maker(engine), cache_seconds=10, cache_size=10)
    loads = 0
    original = authenticator._load

    async def counting(key_hash: str) -> Any:
        nonlocal loads
        loads += 1
        return await original(key_hash)

    authenticator._load = counting  # type: ignore[method-assign]
    try:
        for _ in range(100):
            with pytest.raises(Unauthenticated):
                await authenticator.authenticate("pk_guessing")
        assert loads == 1
    finally:
        await engine.dispose()


async def test_a_frozen_database_answers_key_lookups_with_a_quick_503(tmp_path: Path) -> None:
    """With PostgreSQL stopped (SIGSTOP), an uncached key once hung for 25 s; now 503 within the lookup timeout.

    Every request: a cached key is still served (200); an uncached valid key and a bad key get
    503 auth_unavailable with Retry-After in about auth.lookup_timeout_s; after the thaw all work.
    """
    cluster = PostgresCluster()
    cluster.start()
    try:
        config = server_config(
            tmp_path, None, database={"url": cluster.url}, auth={"lookup_timeout_s": 1, "key_cache_seconds": 60}
        )
        server = start_pacemaker(tmp_path, config)
        try:
            uncached = json.loads(server.cli("keys", "create", "--name", "uncached", "--json").stdout)["key"]
            async with server.client() as cached:
                assert (await cached.post("/v1/tasks", json={"query": "warm the cache"})).status_code == 200
                cluster.freeze()
                try:
                    assert (await cached.post("/v1/tasks", json={"query": "cached key"})).status_code == 200
                    for key in (uncached, "pk_bogus_while_frozen"):
                        async with server.client(key) as http:
                            started = time.monotonic()
                            response = await http.post("/v1/tasks", json={"query": "x"})
                            elapsed = time.monotonic() - started
                        assert response.status_code == 503, response.text
                        assert response.json()["code"] == "auth_unavailable"
                        assert response.headers["retry-after"] == "1"
                        assert elapsed < 1 + 3, elapsed  # the lookup timeout plus a generous margin
                finally:
                    cluster.thaw()
                for _ in range(50):  # the pool's broken connections are replaced on the next checkouts
                    async with server.client(uncached) as http:
                        if (await http.post("/v1/tasks", json={"query": "after the thaw"})).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError("key lookups did not recover after the thaw")
        finally:
            server.process.stop()
    finally:
        cluster.destroy()
