"""The `pacemaker` console command: serve, migrate, manage API keys, prune old records, write the OpenAPI schema."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from app.audit.repository import AuditRepository
from app.auth.keys import hash_key
from app.auth.principal import KeyLimits
from app.auth.repository import ApiKeyRepository
from app.config import ConfigError, Settings, load_settings
from app.db import create_engine, create_session_maker, display_url, migrate, schema_status, session_scope
from app.tasks.store import prune_tasks

T = TypeVar("T")

# Exit status of a command that needs the schema on a database that is not migrated (and of
# `migrate --check`): distinct from 1 (failed) and 2 (bad settings), so that scripts can tell.
EXIT_NOT_MIGRATED = 3
# What a database that cannot be reached raises: OSError from the socket (refused, no such host),
# TimeoutError, or the driver's own error wrapped by SQLAlchemy (bad password, no such database).
DATABASE_ERRORS = (OSError, TimeoutError, DBAPIError)
CONNECT_TIMEOUT_S = 10.0


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    database = getattr(args, "database", None)  # "schema": reads or writes tables; "connect": migrate
    try:
        if database == "schema":
            # A fresh container or checkout: one line saying what to run, never SQLAlchemy's
            # "no such table" traceback. Never migrates by itself: changing a shared schema is an
            # operator's step (a migration Job), not a side effect of listing keys.
            refusal = _schema_refusal(settings)
            if refusal is not None:
                code, line = refusal
                print(f"pacemaker: {line}", file=sys.stderr)
                sys.exit(code)
        sys.exit(handler(args, settings))
    except DATABASE_ERRORS as exc:
        if database is None:
            raise
        print(f"pacemaker: the database {display_url(settings.database.url)} failed: {_reason(exc)}", file=sys.stderr)
        sys.exit(1)


def _schema_refusal(settings: Settings) -> tuple[int, str] | None:
    """(exit status, one line) when the database cannot serve a command that needs its tables."""
    url = settings.database.url

    async def check() -> str | None:
        engine = create_engine(settings.database)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                status = await schema_status(engine, url)
        finally:
            await engine.dispose()
        return status.problem(display_url(url))

    try:
        problem = _run(check)
    except DATABASE_ERRORS as exc:
        return 1, f"cannot reach the database {display_url(url)}: {_reason(exc)}"
    return None if problem is None else (EXIT_NOT_MIGRATED, problem)


def _reason(exc: BaseException) -> str:
    """The first line of what failed: the driver's message ('database "x" does not exist'), or the
    socket's error with its type ('ConnectionRefusedError: [Errno 111] ...')."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacemaker", description="Pacemaker, an AI agent core.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="default: server.host")
    serve.add_argument("--port", type=int, help="default: server.port")
    serve.add_argument("--workers", type=_positive, default=1, help="needs limits.redis_url when more than 1")
    serve.set_defaults(handler=_serve)

    migrate_command = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate_command.add_argument(
        "--check",
        action="store_true",
        help=f"change nothing; exit 0 if the schema is current, {EXIT_NOT_MIGRATED} if it needs migrating",
    )
    migrate_command.set_defaults(handler=_migrate, database="connect")
    commands.add_parser("check-config", help="validate the settings and exit").set_defaults(handler=_check_config)

    dev = commands.add_parser("dev-key", help="create the development key if there is no key yet, and print it")
    dev.set_defaults(handler=_dev_key, database="schema")

    openapi = commands.add_parser("openapi", help="write the OpenAPI schema")
    openapi.add_argument("--out", type=Path, default=Path("openapi.json"))
    openapi.set_defaults(handler=_openapi)

    audit = commands.add_parser("audit", help="audit log upkeep").add_subparsers(required=True, metavar="ACTION")
    prune = audit.add_parser("prune", help="delete audit rows older than a number of days (retention)")
    prune.add_argument("--older-than-days", type=_positive, required=True)
    prune.add_argument("--batch-size", type=_positive, default=10_000, help="rows per transaction")
    prune.set_defaults(handler=_audit_prune, database="schema")

    tasks = commands.add_parser("tasks", help="task record upkeep").add_subparsers(required=True, metavar="ACTION")
    prune_tasks = tasks.add_parser("prune", help="delete task records older than a number of days (retention)")
    prune_tasks.add_argument("--older-than-days", type=_positive, required=True)
    prune_tasks.add_argument("--batch-size", type=_positive, default=10_000, help="records per transaction")
    prune_tasks.set_defaults(handler=_tasks_prune, database="schema")

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(required=True, metavar="ACTION")
    create = keys.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--json", action="store_true", help="print {id, name, prefix, key} as JSON")
    create.add_argument("--admin", action="store_true", help="may read every key's audit log (GET /v1/audit)")
    create.add_argument("--tools", help="comma-separated tools this key may use (default: all)")
    create.add_argument("--sandbox-timeout-s", type=float, help="ceiling on a sandboxed run's wall time")
    create.add_argument("--sandbox-memory-mb", type=_positive, help="ceiling on a sandboxed run's memory")
    create.add_argument("--sandbox-fuel", type=_fuel, help="ceiling on a sandboxed run's fuel (CPU)")
    create.add_argument("--rpm", type=_positive, help="requests per minute (default: limits.rpm)")
    create.add_argument("--burst", type=_positive, help="request burst (default: rpm)")
    create.add_argument("--tpm", type=_positive, help="tokens per minute (default: limits.tpm)")
    create.add_argument(
        "--max-concurrency", type=_positive, help="requests in flight (default: limits.max_concurrency)"
    )
    create.add_argument("--max-tokens-per-request", type=_positive, help="estimated tokens ceiling per request")
    create.add_argument("--budget-usd", type=_amount, help="spending limit in USD")
    create.add_argument("--budget-period", choices=["day", "month"], help="budget resets each UTC day or month")
    create.add_argument(
        "--max-background-tasks",
        type=_positive,
        help="background tasks queued or running at once (default: limits.max_background_tasks)",
    )
    create.set_defaults(handler=_keys_create, database="schema")
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.set_defaults(handler=_keys_list, database="schema")
    revoke = keys.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key", help="the key's id or its shown prefix (pk_...)")
    revoke.set_defaults(handler=_keys_revoke, database="schema")
    return parser


INT32_MAX = 2_147_483_647  # the key columns are 32-bit integers on PostgreSQL


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be between 1 and {INT32_MAX}")
    return value


def _fuel(text: str) -> int:
    value = int(float(text))  # accepts 5e10
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _amount(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except ArithmeticError:
        raise argparse.ArgumentTypeError("must be an amount in USD, e.g. 25 or 0.50") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError("must be a non-negative amount")
    return value


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from app import server  # uvicorn is imported by this command only

    try:
        options = server.uvicorn_options(settings, host=args.host, port=args.port, workers=args.workers)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    server.prepare_process(settings)
    server.run(options)
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.check:
        refusal = _schema_refusal(settings)
        if refusal is not None:
            code, line = refusal
            print(f"pacemaker: {line}", file=sys.stderr)
            return code
        print(f"the database {display_url(settings.database.url)} has the schema this version needs")
        return 0
    migrate(settings.database.url)
    return 0


def _check_config(_args: argparse.Namespace, settings: Settings) -> int:
    print(f"configuration ok: {len(settings.models)} models, database {settings.database.url.split(':', 1)[0]}")
    return 0


def _openapi(args: argparse.Namespace, settings: Settings) -> int:
    from app.main import create_app

    schema = create_app(settings).openapi()
    args.out.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


def _keys_create(args: argparse.Namespace, settings: Settings) -> int:
    async def create() -> tuple[int, str, str]:
        async with _repository(settings) as repo:
            limits = KeyLimits.of(args)
            sandbox = {
                name: value
                for name, value in (
                    ("timeout_s", args.sandbox_timeout_s),
                    ("memory_mb", args.sandbox_memory_mb),
                    ("fuel", args.sandbox_fuel),
                )
                if value is not None
            }
            tools = [name.strip() for name in args.tools.split(",") if name.strip()] if args.tools is not None else None
            row, plaintext = await repo.create(
                args.name, limits, is_admin=args.admin, allowed_tools=tools, sandbox_limits=sandbox or None
            )
            assert row.id is not None
            return row.id, row.prefix, plaintext

    key_id, prefix, plaintext = _run(create)
    if args.json:
        print(json.dumps({"id": key_id, "name": args.name, "prefix": prefix, "key": plaintext}))
    else:
        print(f"created key {key_id} ({args.name}); it is shown only now:\n{plaintext}")
    return 0


def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    async def listing() -> list[str]:
        async with _repository(settings) as repo:
            rows = await repo.list(include_revoked=args.all)
        return [
            f"{row.id}\t{row.prefix}\t{row.name}\t{row.created_at:%Y-%m-%d %H:%M}"
            + ("\trevoked" if row.revoked_at else "")
            for row in rows
        ]

    lines = _run(listing)
    print("id\tprefix\tname\tcreated" if lines else "no keys")
    for line in lines:
        print(line)
    return 0


def _keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def revoke() -> bool:
        async with _repository(settings) as repo:
            return await repo.revoke(args.key) is not None

    if not _run(revoke):
        print(f"no active key matches {args.key!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key} (other instances stop accepting it within auth.key_cache_seconds)")
    return 0


def _audit_prune(args: argparse.Namespace, settings: Settings) -> int:
    cutoff = datetime.now(UTC) - timedelta(days=args.older_than_days)

    async def prune() -> int:
        engine = create_engine(settings.database)
        deleted = 0
        try:
            session_maker = create_session_maker(engine)
            while True:  # small transactions, so that a big prune never locks the table for long
                async with session_scope(session_maker) as session:
                    batch = await AuditRepository(session).delete_before(cutoff, args.batch_size)
                deleted += batch
                if batch < args.batch_size:
                    return deleted
        finally:
            await engine.dispose()

    print(f"deleted {_run(prune)} audit rows created before {cutoff:%Y-%m-%d %H:%M} UTC")
    return 0


def _tasks_prune(args: argparse.Namespace, settings: Settings) -> int:
    cutoff = datetime.now(UTC) - timedelta(days=args.older_than_days)

    async def prune() -> int:
        engine = create_engine(settings.database)
        try:
            return await prune_tasks(engine, cutoff, args.batch_size)
        finally:
            await engine.dispose()

    print(f"deleted {_run(prune)} task records created before {cutoff:%Y-%m-%d %H:%M} UTC")
    return 0


def _dev_key(_args: argparse.Namespace, settings: Settings) -> int:
    """For `make run`: make a first key on an empty database and keep it where it can be printed again."""
    path = settings.auth.dev_key_file

    async def ensure() -> str | None:
        async with _repository(settings) as repo:
            if path.is_file():
                saved = path.read_text().strip()
                row = await repo.find_active_by_hash(hash_key(saved))
                if row is not None:
                    await repo.make_admin(row)  # one made before the dashboard needed an admin key
                    return saved
            if await repo.count_active() > 0:
                return None
            # An admin key: the dashboard (and GET /v1/audit) need one.
            _row, plaintext = await repo.create("development", is_admin=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(plaintext + "\n")
            os.chmod(path, 0o600)
            return plaintext

    key = _run(ensure)
    base = f"http://{settings.server.host}:{settings.server.port}"
    if key is None:
        print("API keys exist already; create one with: pacemaker keys create --name NAME")
        return 0
    print(
        f"\nDevelopment API key (saved in {path}):\n  {key}\n\nTry it:\n"
        f"  curl -s {base}/v1/tasks -H 'Authorization: Bearer {key}' "
        "-H 'Content-Type: application/json' -d '{\"query\": \"What is 17 * 23 + 4?\"}'\n"
        f"  curl -N {base}/v1/tasks -H 'Authorization: Bearer {key}' "
        '-H \'Content-Type: application/json\' -d \'{"query": "Tell me about agents", "stream": true}\'\n'
        f"API docs: {base}/docs\n"
        f"Dashboard: {base}/dashboard (sign in with the key above, an admin key)\n"
    )
    return 0


@asynccontextmanager
async def _repository(settings: Settings) -> AsyncIterator[ApiKeyRepository]:
    """An ApiKeyRepository in one committed unit of work, its engine disposed afterwards."""
    engine = create_engine(settings.database)
    try:
        async with session_scope(create_session_maker(engine)) as session:
            yield ApiKeyRepository(session)
    finally:
        await engine.dispose()


def _run(work: Callable[[], Coroutine[object, object, T]]) -> T:
    return asyncio.run(work())


if __name__ == "__main__":
    main()
