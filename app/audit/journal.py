"""The audit journal: a directory of JSON-lines segments where every row is appended as it is submitted."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

_DATETIME_FIELDS = ("created_at", "finished_at")
_DECIMAL_FIELDS = ("cost_usd",)
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


def decode(line: bytes) -> dict[str, Any]:
    row: dict[str, Any] = orjson.loads(line)
    for name in _DATETIME_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    for name in _DECIMAL_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = Decimal(row[name])
    return row


@dataclass(eq=False, slots=True)
class Segment:
    path: Path
    fd: int  # open read-write and flocked for as long as this process owns the segment
    own: bool  # written by this process (else claimed from a process that is gone)
    written: int = 0  # bytes of whole rows in the file (a claimed segment: its size when claimed)
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
    """Segments of this process, and the claiming of those nobody holds.

    A row is one write(2) to the current segment (no fsync: the page cache survives a process
    crash); the writer fsyncs in a thread once per flush interval and removes a segment once every
    row of it is in the database. Each process holds an flock on the segments it writes, so a
    segment nobody holds (its process died, however it died) is anyone's to claim and replay.
    """

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._clock = clock
        self._own: list[Segment] = []  # oldest first; the last may be current
        self._current: Segment | None = None
        self._sequence = 0
        self._open_error: OSError | None = None
        self._retry_open_at = 0.0

    # --- the request path: one write(2) ------------------------------------------------------

    def append(self, data: bytes) -> tuple[Segment, int]:
        """Append one encoded row; its segment and end offset. Raises OSError when the disk refuses."""
        segment = self._current or self._open_segment()
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
            segment = self._create()
        except OSError as exc:
            self._open_error, self._retry_open_at = exc, now + 1.0
            raise
        self._open_error = None
        self._own.append(segment)
        self._current = segment
        return segment

    def _create(self) -> Segment:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Names sort in the order written: time first, then the pid and a counter for uniqueness.
        self._sequence += 1
        name = f"segment-{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}.jsonl"
        # Locked under a name nobody scans, then renamed: no one can claim it in between.
        temporary = self.directory / f".{name}.new"
        fd = os.open(temporary, _OPEN_FLAGS, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temporary, self.directory / name)
        except OSError:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        return Segment(self.directory / name, fd, own=True, opened=self._clock())

    # --- the writer's side -------------------------------------------------------------------

    def own_unwritten(self) -> Segment | None:
        """The oldest segment of this process with rows not yet in the database."""
        return next((segment for segment in self._own if segment.unwritten), None)

    def has_unwritten(self) -> bool:
        return self.own_unwritten() is not None

    def maintain(self, *, seal_by_age: bool) -> None:
        """Seal the current segment when due, and remove the sealed ones whose rows are all in.

        By age only while the database takes writes: then a sealed segment is soon removed, and a
        restart replays little that was in already; in an outage segments grow to their size limit,
        so that few stay open (each holds a descriptor and its lock).
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
        os.close(segment.fd)  # after the unlink: nobody can claim it in between
        if segment in self._own:
            self._own.remove(segment)
        if segment is self._current:
            self._current = None

    def sync_job(self) -> tuple[Callable[[], None], Callable[[], None]] | None:
        """(work for a thread: fsync what was appended since the last one; then, on the loop: note it), or None."""
        targets = [(segment, segment.written) for segment in self._own if segment.synced < segment.written]
        if not targets:
            return None
        # Duplicates, so that a segment removed meanwhile never leaves the thread with a closed descriptor.
        fds = [os.dup(segment.fd) for segment, _ in targets]
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

        return work, done

    def sync_now(self) -> None:
        """fsync on the spot (after shutdown, when no writer is left to do it)."""
        if (job := self.sync_job()) is not None:
            work, done = job
            work()
            done()

    def close(self) -> None:
        """At shutdown: close every segment (fsynced first); those whose rows are all in are removed."""
        self._current = None
        self.sync_now()  # normally nothing left: the writer's last sync ran in its thread
        for segment in list(self._own):
            if not segment.unwritten:
                self.remove(segment)
                continue
            os.close(segment.fd)  # its lock goes with it: the next start claims it
            self._own.remove(segment)

    def read(self, segment: Segment, limit: int) -> list[Line]:
        """Up to `limit` whole lines from the segment's committed offset (a claimed one: up to its end)."""
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
                lines.append(Line(position + start, _decoded(raw), raw))
            position += start
            buffer = buffer[start:]
        if ended and not lines and buffer and stop is None:
            # A crash mid-append leaves a torn last line; the rows before it were whole.
            log.warning("audit journal %s: ignoring a torn last line", segment.path.name)
            lines.append(Line(position + len(buffer), None, b""))
        return lines

    def leftovers(self) -> list[Path]:
        """Segments no living process held when looked at (a crashed or stopped one left them), oldest first."""
        if not self.directory.is_dir():
            return []
        for stale in self.directory.glob(".segment-*.new"):  # a crash between create and rename
            if (segment := self.claim(stale)) is not None:
                self.remove(segment)
        mine = {segment.path for segment in self._own}
        found = []
        for path in sorted(self.directory.glob("segment-*.jsonl")):
            if path not in mine and (segment := self.claim(path)) is not None:
                os.close(segment.fd)  # claimed for good only when its turn to be replayed comes
                found.append(path)
        return found

    def claim(self, path: Path) -> Segment | None:
        """The segment at `path`, locked for this process; None when a living process holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # replayed and removed by its owner meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stat = os.fstat(fd)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        if stat.st_nlink == 0:  # removed by its owner between our open and our lock
            os.close(fd)
            return None
        return Segment(path, fd, own=False, written=stat.st_size, synced=stat.st_size, named=True)


def _decoded(raw: bytes) -> dict[str, Any] | None:
    try:
        return decode(raw)
    except (orjson.JSONDecodeError, ValueError, ArithmeticError, TypeError):
        return None


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
