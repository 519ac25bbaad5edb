"""The exit guard: a `proc_exit` that records any exit status, where wasmtime's own refuses those >= 126."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from wasmtime import Caller, FuncType, Linker, ValType

from app.sandbox.hostcall import EndRun, RawArgs, define_raw, new_trap

_MODULE = "wasi_snapshot_preview1"


@dataclass(slots=True)
class ExitRecord:
    # The status the guest passed to proc_exit, as a signed 32-bit value (WASI's exitcode is 32
    # bits wide: 256 stays 256 and -1 stays -1, no POSIX truncation to a byte); None: no exit call.
    status: int | None = None


class ExitGuard:
    """Shadows `proc_exit`: the status is kept in the run's record and the guest ends with a trap.

    wasmtime's proc_exit turns a status outside [0, 126) into an error instead of an exit, which
    loses the run's outcome; here every status is an ordinary exit.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # a run executes wholly on one worker thread
        self._callbacks: list[object] = []

    def install(self, linker: Linker) -> None:
        linker.allow_shadowing = True
        proc_exit = FuncType([ValType.i32()], [])
        self._callbacks.append(define_raw(linker, _MODULE, "proc_exit", proc_exit, self._proc_exit))

    @contextmanager
    def run(self) -> Iterator[ExitRecord]:
        """Mark the calling thread as running a guest whose exit status goes in the yielded record."""
        record = ExitRecord()
        self._local.record = record
        try:
            yield record
        finally:
            self._local.record = None

    def _proc_exit(self, _caller: Caller, args: RawArgs) -> None:
        record: ExitRecord | None = getattr(self._local, "record", None)
        if record is not None:
            record.status = args[0].i32
        raise EndRun(new_trap("proc_exit"))
