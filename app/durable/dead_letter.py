"""Dead letters: rows the database refuses for what they hold, kept as JSON lines, and the rule that tells."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from app.durable.journal import encode, fsync_directory


class DeadLetters:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, letters: list[tuple[dict[str, Any] | bytes, str]]) -> Path:
        """Append (row or unreadable journal line, reason) pairs to today's file, fsynced; raises OSError."""
        now = datetime.now(UTC)
        data = b"".join(_letter(content, reason, now) for content, reason in letters)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"dead-letter-{now:%Y-%m-%d}.jsonl"
        new = not path.exists()
        # One write of whole lines to an O_APPEND file: processes sharing the directory do not interleave.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_directory(self.directory)
        return path


def _letter(content: dict[str, Any] | bytes, reason: str, now: datetime) -> bytes:
    head = {"dead_lettered_at": now.isoformat(), "reason": reason}
    if isinstance(content, dict):
        try:
            return b'{"row":' + encode(content).rstrip(b"\n") + b"," + orjson.dumps(head)[1:] + b"\n"
        except TypeError:  # a value JSON cannot carry (an integer beyond 64 bits): kept as text
            content = repr(content).encode()
    return orjson.dumps({**head, "line": content.decode("utf-8", "replace")}) + b"\n"


# SQLSTATE classes of errors in the rows themselves: 22 data exception, 23 integrity constraint violation.
_ROW_CLASSES = ("22", "23")
_SQLITE_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)


def row_fault(exc: BaseException) -> str | None:
    """Why the database refuses rows for what they hold (no retry can help), or None for any other failure.

    Any other failure (connection lost, timeout, server down, and also an undefined table or a
    missing privilege, SQLSTATE class 42, which the same rows will pass once an operator fixes it)
    is the database's, and the rows wait for it.
    """
    chain = _chain(exc)
    for error in chain:
        state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(state, str) and len(state) == 5:
            return _describe(error) if state[:2] in _ROW_CLASSES else None
    for error in chain:
        # SQLite's, and a value a driver cannot even encode (a lone surrogate, an int beyond 64 bits).
        if isinstance(error, (*_SQLITE_ROW_ERRORS, ValueError, TypeError, OverflowError)):
            return _describe(error)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and the driver errors it wraps (SQLAlchemy's .orig, then each __cause__)."""
    chain: list[BaseException] = []
    error: BaseException | None = exc
    while error is not None and len(chain) < 10 and all(error is not seen for seen in chain):
        chain.append(error)
        error = getattr(error, "orig", None) or error.__cause__
    return chain


def _describe(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"[:500]
