"""The audit spool: an append-only directory of JSON-lines segments, for rows the database cannot take now.

Each append is flushed and fsynced before it returns, so a row that reached the spool survives a
crash. Segments are replayed oldest first; the one being written is sealed before it is read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

_DATETIME_FIELDS = ("created_at", "finished_at")
_DECIMAL_FIELDS = ("cost_usd",)
SEGMENT_MAX_BYTES = 8 * 1024 * 1024


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: a float would round the cost
    raise TypeError(f"cannot spool {type(value).__name__}")


def encode(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, default=_default) + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    row: dict[str, Any] = orjson.loads(line)
    for name in _DATETIME_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    for name in _DECIMAL_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = Decimal(row[name])
    return row


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._current: Path | None = None
        self._sequence = 0

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write rows durably (flush + fsync). Raises OSError when the disk refuses (full, read-only)."""
        if not rows:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        current = self._current
        if current is None or not current.exists() or current.stat().st_size > SEGMENT_MAX_BYTES:
            self._current = current = self._new_segment()
        data = b"".join(encode(row) for row in rows)
        with current.open("ab") as segment:
            segment.write(data)
            segment.flush()
            os.fsync(segment.fileno())

    def seal(self) -> None:
        """Later appends go to a new segment, so that the sealed ones can be read and removed."""
        self._current = None

    def segments(self) -> list[Path]:
        """The segments this process may replay: its own, and those of processes no longer running.

        Several workers (or instances) may share one spool directory; a live one's segments are
        its own to replay, or it would find them gone under its next append.
        """
        if not self.directory.is_dir():
            return []
        return [path for path in sorted(self.directory.glob("segment-*.jsonl")) if _replayable(path)]

    def has_rows(self) -> bool:
        return any(_size(path) > 0 for path in self.segments())

    def read(self, segment: Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        with segment.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.endswith(b"\n"):
                    # A crash mid-append leaves a torn last line; the rows before it are whole.
                    log.warning("audit spool %s: ignoring a torn line %d", segment.name, number)
                    break
                try:
                    batch.append(decode(line))
                except (orjson.JSONDecodeError, ValueError, ArithmeticError):
                    log.error("audit spool %s: line %d is unreadable and was skipped", segment.name, number)
                    continue
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def remove(self, segment: Path) -> None:
        segment.unlink(missing_ok=True)
        if segment == self._current:
            self._current = None

    def _new_segment(self) -> Path:
        # Names sort in the order written: time first, then a counter for appends within one tick.
        self._sequence += 1
        return self.directory / f"segment-{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}.jsonl"


def _replayable(segment: Path) -> bool:
    try:
        pid = int(segment.name.split("-")[2])
    except (IndexError, ValueError):
        return True  # not named by us: nobody is writing to it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True  # its writer is gone (a crash, an old run): an orphan, ours to replay
    except PermissionError:
        return False
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0  # replayed and removed by its owner meanwhile
