"""A journal: a directory of JSON-lines segments where every row is appended as it is submitted."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import DateTime, Float, Numeric, Table, TypeDecorator

log = logging.getLogger(__name__)

SEGMENT_MAX_BYTES = 32 * 1024 * 1024
# A segment is sealed after this long, so that a restart replays little that was written already.
SEGMENT_MAX_SECONDS = 1.0
_READ_CHUNK = 1024 * 1024
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: a float would round the cost
    raise TypeError(f"cannot journal {type(value).__name__}")


def encode(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, default=_default) + b"\n"


@dataclass(frozen=True, slots=True)
class RowCodec:
    """Which fields of a row JSON carries as strings come back as datetimes, and which as exact Decimals."""

    datetimes: tuple[str, ...] = ()
    decimals: tuple[str, ...] = ()

    @classmethod
    def of(cls, table: Table) -> RowCodec:
        """The codec of a table's rows, read from its column types."""
        datetimes, decimals = [], []
        for column in table.columns:
            kind = column.type.impl_instance if isinstance(column.type, TypeDecorator) else column.type
            if isinstance(kind, DateTime):
                datetimes.append(column.name)
            elif isinstance(kind, Numeric) and not isinstance(kind, Float):
                decimals.append(column.name)
        return cls(tuple(datetimes), tuple(decimals))

    def decode(self, line: bytes) -> dict[str, Any]:
        row: dict[str, Any] = orjson.loads(line)
        for name in self.datetimes:
            if isinstance(row.get(name), str):
                row[name] = datetime.fromisoformat(row[name])
        for name in self.decimals:
            if isinstance(row.get(name), str):
                row[name] = Decimal(row[name])
        return row


@dataclass(eq=False, slots=True)
class Segment:
    path: Path
    own: bool  # written by this process (else claimed from a process that is gone)
    fd: int | None = None  # the current segment's, for appending; others' only while read
    written: int = 0  # bytes of whole rows in the file (a claimed one: its size when opened)
    committed: int = 0  # bytes whose rows are in the database (or dead-lettered): always a prefix
    synced: int = 0  # bytes known to be fsynced
    rows: int = 0  # rows appended (by this process)
    rows_done: int = 0  # rows whose offsets `committed` has passed
    named: bool = False  # its directory entry is fsynced
    opened: float = 0.0

    @property
    def unwritten(self) -> bool:
        return self.committed < self.written


@dataclass(slots=True)
class Line:
    end: int  # offset just after the line, in its segment
    row: dict[str, Any] | None  # None: unreadable (raw holds it) or a torn last line (raw is empty)
    raw: bytes


class Journal:
    """This process's segments, and the claiming of those whose process is gone.

    A row is one write(2) to the current segment (no fsync: the page cache survives a process
    crash); the writer fsyncs in a thread once per flush interval and removes a segment once every
    row of it is in the database. Segments are named segment-<time>-<owner>-<n>.jsonl; the owner
    holds an flock on owner-<owner>.lock for as long as it lives, so the segments of an owner whose
    lock can be taken (its process died, however it died) are anyone's: renamed to the claimer's
    name, atomically, so that one process replays each.
    """

    def __init__(self, directory: Path, codec: RowCodec, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.codec = codec
        self._clock = clock
        self.owner = f"{os.getpid()}.{secrets.token_hex(4)}"  # no "-": it is a field of segment names
        self._lock_fd: int | None = None
        self._own: list[Segment] = []  # oldest first; the last may be current
        self._current: Segment | None = None
        self._sequence = 0
        self._open_error: OSError | None = None
        self._retry_open_at = 0.0
        self._syncing: asyncio.Future[None] | None = None

    # --- the request path: one write(2) ------------------------------------------------------

    def append(self, data: bytes) -> tuple[Segment, int]:
        """Append one encoded row; its segment and end offset. Raises OSError when the disk refuses."""
        segment = self._current or self._open_segment()
        assert segment.fd is not None
        try:
            written = os.write(segment.fd, data)
        except OSError:
            self._current = None  # whatever part of the row reached the file stays its torn last line
            raise
        if written != len(data):
            self._current = None
            raise OSError(f"short write to {segment.path.name} ({written} of {len(data)} bytes)")
        segment.written += written
        segment.rows += 1
        return segment, segment.written

    def _open_segment(self) -> Segment:
        now = self._clock()
        if self._open_error is not None and now < self._retry_open_at:
            raise self._open_error  # a broken disk is not probed on every request
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._hold_lock()
            # Names sort in the order written: time first, then the owner and a counter.
            self._sequence += 1
            path = self.directory / f"segment-{time.time_ns():020d}-{self.owner}-{self._sequence:06d}.jsonl"
            segment = Segment(path, own=True, fd=os.open(path, _OPEN_FLAGS, 0o644), opened=now)
        except OSError as exc:
            self._open_error, self._retry_open_at = exc, now + 1.0
            raise
        self._open_error = None
        self._own.append(segment)
        self._current = segment
        return segment

    def _hold_lock(self) -> None:
        """Taken before the first segment exists, so that no segment of a living process looks orphaned."""
        if self._lock_fd is None:
            fd = os.open(self.directory / f"owner-{self.owner}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            self._lock_fd = fd

    # --- the writer's side -------------------------------------------------------------------

    def own_unwritten(self) -> Segment | None:
        """The oldest segment of this process with rows not yet in the database."""
        return next((segment for segment in self._own if segment.unwritten), None)

    def maintain(self, *, seal_by_age: bool) -> None:
        """Seal the current segment when due, and remove the sealed ones whose rows are all in.

        By age only while the database takes writes: then a sealed segment is soon removed, and a
        restart replays little that was in already; in an outage segments grow to their size limit.
        """
        current = self._current
        if current is not None and (
            current.written >= SEGMENT_MAX_BYTES
            or (seal_by_age and current.written and self._clock() - current.opened >= SEGMENT_MAX_SECONDS)
        ):
            self._current = None
        for segment in [s for s in self._own if s is not self._current and not s.unwritten]:
            self.remove(segment)

    def remove(self, segment: Segment) -> None:
        segment.path.unlink(missing_ok=True)
        self._close(segment)
        if segment in self._own:
            self._own.remove(segment)
        if segment is self._current:
            self._current = None

    def _close(self, segment: Segment) -> None:
        if segment.fd is not None:
            os.close(segment.fd)
            segment.fd = None

    def sync_soon(self, on_result: Callable[[BaseException | None], None]) -> None:
        """Start an fsync of what was appended since the last one in a thread, unless one runs already."""
        if self._syncing is not None or (job := self._sync_job()) is None:
            return
        work, done = job
        future = asyncio.get_running_loop().run_in_executor(None, work)
        self._syncing = future

        def finished(outcome: asyncio.Future[None]) -> None:
            self._syncing = None
            if outcome.cancelled():
                return
            if (failure := outcome.exception()) is None:
                done()
            on_result(failure)

        future.add_done_callback(finished)

    async def synced(self, on_result: Callable[[BaseException | None], None]) -> None:
        """Wait for the fsync in flight, then fsync (in a thread) whatever was appended after it began."""
        for _ in range(2):
            self.sync_soon(on_result)
            if self._syncing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._syncing)

    def _sync_job(self) -> tuple[Callable[[], None], Callable[[], None]] | None:
        """(work for a thread: fsync what was appended since the last one; then, on the loop: note it), or None."""
        targets = [(s, s.written) for s in self._own if s.synced < s.written and s.fd is not None]
        if not targets:
            return None
        # Duplicates, so that a segment closed meanwhile never leaves the thread with a stale descriptor.
        fds = [os.dup(segment.fd) for segment, _ in targets if segment.fd is not None]
        new_names = not all(segment.named for segment, _ in targets)

        def work() -> None:
            try:
                for fd in fds:
                    os.fdatasync(fd)
                if new_names:
                    fsync_directory(self.directory)
            finally:
                for fd in fds:
                    os.close(fd)

        def done() -> None:
            for segment, upto in targets:
                segment.synced, segment.named = max(segment.synced, upto), True
                if segment is not self._current and segment.synced >= segment.written:
                    self._close(segment)  # sealed and on disk: no descriptor is kept for it

        return work, done

    def sync_now(self) -> None:
        """fsync on the spot (after shutdown, when no writer is left to do it)."""
        if (job := self._sync_job()) is not None:
            work, done = job
            work()
            done()

    def close(self) -> int:
        """At shutdown: close every segment, removing those whose rows are all in; how many are kept."""
        self._current = None
        kept = 0
        for segment in list(self._own):
            if segment.unwritten:
                self._close(segment)  # the next start claims it (its owner lock goes below)
                self._own.remove(segment)
                kept += 1
            else:
                self.remove(segment)
        if self._lock_fd is not None:
            if not kept:
                (self.directory / f"owner-{self.owner}.lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        return kept

    def read(self, segment: Segment, limit: int) -> list[Line]:
        """Up to `limit` whole lines from the segment's committed offset (a claimed one: up to its end)."""
        if segment.fd is None:
            segment.fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)  # closed with the segment
        lines: list[Line] = []
        position = segment.committed  # the file offset of buffer[0]
        stop = segment.written if segment.own else None
        buffer = b""
        ended = False
        while len(lines) < limit:
            size = _READ_CHUNK if stop is None else min(_READ_CHUNK, stop - position - len(buffer))
            chunk = os.pread(segment.fd, size, position + len(buffer)) if size > 0 else b""
            if not chunk:
                ended = True
                break
            buffer += chunk
            start = 0
            while len(lines) < limit and (newline := buffer.find(b"\n", start)) >= 0:
                raw = buffer[start : newline + 1]
                start = newline + 1
                lines.append(Line(position + start, self._decoded(raw), raw))
            position += start
            buffer = buffer[start:]
        if ended and not lines and buffer and stop is None:
            # A crash mid-append leaves a torn last line; the rows before it were whole.
            log.warning("journal %s: ignoring a torn last line", segment.path)
            lines.append(Line(position + len(buffer), None, b""))
        return lines

    def leftovers(self) -> list[Path]:
        """Claim the segments of owners that are gone (renamed as this process's); their new paths, oldest first."""
        if not self.directory.is_dir():
            return []
        by_owner: dict[str, list[Path]] = {}
        for path in self.directory.glob("segment-*.jsonl"):
            fields = path.name.split("-")
            owner = fields[2] if len(fields) == 4 else ""  # older spool names: <pid>, with no lock at all
            if owner != self.owner:
                by_owner.setdefault(owner, []).append(path)
        for lock in self.directory.glob("owner-*.lock"):
            by_owner.setdefault(lock.name.removeprefix("owner-").removesuffix(".lock"), [])
        claimed = []
        for owner, paths in by_owner.items():
            if owner == self.owner or (held := _take_lock(self.directory / f"owner-{owner}.lock")) is False:
                continue  # a living process: its segments are its own
            for path in sorted(paths):
                self._sequence += 1
                target = path.with_name(f"segment-{path.name.split('-')[1]}-{self.owner}-c{self._sequence:06d}.jsonl")
                with contextlib.suppress(FileNotFoundError):  # another process was first, or its owner removed it
                    os.rename(path, target)
                    claimed.append(target)
            if held is not None:
                (self.directory / f"owner-{owner}.lock").unlink(missing_ok=True)
                os.close(held)
        return sorted(claimed)

    def open_claimed(self, path: Path) -> Segment:
        """A claimed segment, to be read to its end and removed. Raises FileNotFoundError if it is gone."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        return Segment(path, own=False, fd=fd, written=size, synced=size, named=True)

    def release(self, segment: Segment) -> None:
        """Stop reading a claimed segment for now (at shutdown): the next start claims it again."""
        self._close(segment)

    def _decoded(self, raw: bytes) -> dict[str, Any] | None:
        try:
            return self.codec.decode(raw)
        except (orjson.JSONDecodeError, ValueError, ArithmeticError, TypeError):
            return None


def _take_lock(path: Path) -> int | bool | None:
    """The owner lock at `path`, taken (its descriptor); False when its owner lives; None when there is none."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:
        os.close(fd)
        raise
    return fd


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
