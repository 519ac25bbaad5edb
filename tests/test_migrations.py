"""Alembic migrations run on SQLite and PostgreSQL, and the models never drift from them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from app.db import migrate
from app.tables import metadata
from tests.support import fresh_postgres_database


def schema_drift(url: str, target: sa.MetaData = metadata) -> list[Any]:
    async def compare() -> list[Any]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), target)
                )
        finally:
            await engine.dispose()

    return asyncio.run(compare())


def table_names(url: str) -> set[str]:
    async def names() -> set[str]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return set(await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(names())


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database("pacemaker_migrations") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"


@pytest.mark.parametrize("database", ["sqlite_url", "postgres_url"])
def test_upgrade_head_creates_the_schema_without_drift(database: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(database)
    migrate(url)
    assert {"api_key", "alembic_version"} <= table_names(url)
    assert schema_drift(url) == []


@pytest.mark.parametrize("database", ["sqlite_url", "postgres_url"])
def test_downgrade_to_base_and_back(database: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(database)
    migrate(url)
    from alembic import command

    from app.db import alembic_config

    command.downgrade(alembic_config(url), "base")
    assert table_names(url) <= {"alembic_version"}
    migrate(url)
    assert schema_drift(url) == []


def test_the_drift_check_notices_a_model_change(sqlite_url: str) -> None:
    """The check above is not vacuous: a column the migrations lack is reported."""
    migrate(sqlite_url)
    changed = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["api_key"].append_column(sa.Column("owner", sa.String(50)))
    drift = schema_drift(sqlite_url, changed)
    assert any(op[0] == "add_column" and op[3].name == "owner" for op in drift), drift
