"""Every `pacemaker` command that needs the tables, on a database nobody migrated (a fresh container or
checkout): one line on stderr saying what to run, exit status 3, never a traceback, and nothing created.
Real subprocesses, on an empty SQLite file and on a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from app.db import alembic_config, migrate
from tests.support import free_port, fresh_postgres_database, pacemaker_env, run_cli

NEEDS_TABLES = [
    ("keys", "create", "--name", "fresh", "--json"),
    ("keys", "list"),
    ("keys", "revoke", "pk_nothing"),
    ("dev-key",),
    ("audit", "prune", "--older-than-days", "30"),
    ("tasks", "prune", "--older-than-days", "30"),
    ("migrate", "--check"),
]


def _env(workdir: Path, url: str) -> dict[str, str]:
    return pacemaker_env(workdir, {"database": {"url": url}, "auth": {"dev_key_file": str(workdir / "dev-key")}})


def _run_all(env: dict[str, str], commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess[str]]:
    # Side by side: each is a Python start (about a second) that then waits on one query.
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda command: run_cli(env, *command, check=False), commands))


def _assert_one_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    command = " ".join(result.args[3:])
    assert "Traceback" not in result.stderr, f"{command}:\n{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"{command}: expected one line on stderr, got:\n{result.stderr}"
    assert result.returncode == status, f"{command}: exit {result.returncode}, expected {status}: {lines[0]}"
    assert result.stdout == "", f"{command} printed: {result.stdout}"
    for needle in needles:
        assert needle in lines[0], f"{command}: {needle!r} not in {lines[0]!r}"
    return lines[0]


def _refused_unmigrated(results: list[subprocess.CompletedProcess[str]]) -> None:
    for result in results:
        line = _assert_one_line(result, 3, "has no schema yet", "run `pacemaker migrate` first")
        assert line.startswith("pacemaker: the database ")


def _works_once_migrated(env: dict[str, str]) -> None:
    assert run_cli(env, "migrate").returncode == 0
    created = json.loads(run_cli(env, "keys", "create", "--name", "fresh", "--json").stdout)
    assert created["key"].startswith("pk_")
    assert "fresh" in run_cli(env, "keys", "list").stdout


def test_an_empty_sqlite_file_gets_one_line_and_is_left_without_tables(tmp_path: Path) -> None:
    database = tmp_path / "pacemaker.db"
    database.touch()
    env = _env(tmp_path, f"sqlite+aiosqlite:///{database}")
    _refused_unmigrated(_run_all(env, NEEDS_TABLES))
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT name FROM sqlite_master").fetchall() == []
    assert not (tmp_path / "dev-key").exists()
    _works_once_migrated(env)


def test_a_missing_sqlite_file_gets_the_same_line(tmp_path: Path) -> None:
    env = _env(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'var' / 'pacemaker.db'}")
    _refused_unmigrated(_run_all(env, [("keys", "create", "--name", "fresh")]))


def _postgres_tables(url: str) -> list[str]:
    async def tables() -> list[str]:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await connection.close()
        return [row["tablename"] for row in rows]

    with ThreadPoolExecutor(1) as pool:  # outside the test session's event loop
        return pool.submit(asyncio.run, tables()).result()


@pytest.mark.postgres
def test_a_fresh_postgres_database_gets_one_line_and_is_left_without_tables(tmp_path: Path) -> None:
    with fresh_postgres_database("cli_fresh") as url:
        env = _env(tmp_path, url)
        _refused_unmigrated(_run_all(env, NEEDS_TABLES))
        assert _postgres_tables(url) == []
        _works_once_migrated(env)


def test_a_schema_behind_this_version_names_both_revisions(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'pacemaker.db'}"
    script = ScriptDirectory.from_config(alembic_config(url))
    (head,) = script.get_heads()
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)
    migrate(url, previous)
    env = _env(tmp_path, url)
    for result in _run_all(env, [("keys", "list"), ("migrate", "--check")]):
        _assert_one_line(result, 3, f"revision {previous} but this version needs {head}", "pacemaker migrate")
    migrate(url)
    assert run_cli(env, "keys", "list").stdout.strip() == "no keys"


def test_a_schema_newer_than_this_version_is_used(tmp_path: Path) -> None:
    """A rolling upgrade migrates before the old replicas are gone: they keep working on it."""
    database = tmp_path / "pacemaker.db"
    migrate(f"sqlite+aiosqlite:///{database}")
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_a_newer_version'")
    env = _env(tmp_path, f"sqlite+aiosqlite:///{database}")
    assert run_cli(env, "keys", "list").stdout.strip() == "no keys"


def test_an_unreachable_database_gets_one_line_without_its_password(tmp_path: Path) -> None:
    env = _env(tmp_path, f"postgresql+asyncpg://pacemaker:hunter2@127.0.0.1:{free_port()}/pacemaker")
    commands = [("keys", "create", "--name", "fresh"), ("migrate",)]
    for result in _run_all(env, commands):
        _assert_one_line(result, 1, "the database postgresql+asyncpg://pacemaker:***@127.0.0.1:", "Connect")
        assert "hunter2" not in result.stderr
