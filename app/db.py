"""Database engine, sessions and migrations (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from app.config import DatabaseSettings

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
    from sqlalchemy.dialects.sqlite import Insert as SqliteInsert

# Stable constraint names, so that Alembic migrations are reproducible across databases.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

SessionMaker = async_sessionmaker[AsyncSession]


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    url = make_url(settings.url)
    kwargs: dict[str, Any] = {"echo": settings.echo, "pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_size"] = settings.pool_size
    engine = create_async_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def insert_on_conflict(table: Table, dialect: str) -> PostgresInsert | SqliteInsert:
    """The dialect's INSERT, the one with ON CONFLICT. PostgreSQL's dialect is imported only on
    PostgreSQL: it is 2.3 MB of a process that runs on SQLite."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgres_insert

        return postgres_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run while a writer commits; busy_timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_session_maker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def session_scope(session_maker: SessionMaker) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits on success, rolls back on error. The only place that commits."""
    async with session_maker() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`. Synchronous: call it outside a running event loop."""
    from alembic import command

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's schema stands against this version's migrations."""

    current: tuple[str, ...]  # the revisions the database is at; () when it has no schema at all
    heads: tuple[str, ...]  # the revisions this version's migrations end at
    known: frozenset[str]  # every revision this version's migrations know

    @property
    def usable(self) -> bool:
        """At head, or ahead of it: a revision this version does not know was made by a newer one
        (a rolling upgrade migrates before the old replicas are gone, and migrations only add)."""
        if not self.current:
            return False
        return set(self.current) == set(self.heads) or not set(self.current) <= self.known

    def problem(self, database: str) -> str | None:
        """One line saying what to run, or None when the schema can be used."""
        if self.usable:
            return None
        if not self.current:
            return f"the database {database} has no schema yet: run `pacemaker migrate` first"
        return (
            f"the database {database} is at schema revision {', '.join(self.current)} but this version needs"
            f" {', '.join(self.heads)}: run `pacemaker migrate` first"
        )


async def schema_status(engine: AsyncEngine, database_url: str) -> SchemaStatus:
    """Read the database's Alembic revision (never touching the schema) and compare it with the scripts'."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Connection

    script = ScriptDirectory.from_config(alembic_config(database_url))

    def current(connection: Connection) -> tuple[str, ...]:
        return tuple(MigrationContext.configure(connection).get_current_heads())

    async with engine.connect() as connection:
        revisions = await connection.run_sync(current)
    return SchemaStatus(
        current=revisions,
        heads=tuple(script.get_heads()),
        known=frozenset(revision.revision for revision in script.walk_revisions()),
    )


def display_url(database_url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(database_url).render_as_string(hide_password=True)
