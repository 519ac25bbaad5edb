"""The sleep guard: WASI clock and poll functions that end a guest's sleep at its own run's deadline."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from wasmtime import Caller, FuncType, Linker, Memory, ValType
from wasmtime import _ffi as ffi

# WASI preview1 errno values and layouts (wasi_snapshot_preview1 witx).
_ERRNO_SUCCESS, _ERRNO_FAULT, _ERRNO_INVAL = 0, 21, 28
_CLOCK_REALTIME, _CLOCK_MONOTONIC, _CLOCK_PROCESS_CPU, _CLOCK_THREAD_CPU = 0, 1, 2, 3
_EVENTTYPE_CLOCK = 0
_SUBCLOCKFLAGS_ABSTIME = 1
_SUBSCRIPTION = struct.Struct("<QB")  # userdata, tag; the tagged union's body starts at byte 16
_SUBSCRIPTION_SIZE = 48
_SUBSCRIPTION_CLOCK = struct.Struct("<I4xQQH")  # clock id, timeout ns, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, errno, type, fd nbytes, fd flags: 32 bytes
_MAX_SUBSCRIPTIONS = 4096
_MODULE = "wasi_snapshot_preview1"


@dataclass(slots=True)
class _Run:
    deadline: float  # host time.monotonic() at which the run must end
    started_ns: int  # host monotonic_ns at the start: the guest's monotonic zero


class SleepGuard:
    """Shadows `poll_oneoff` and `clock_time_get` so that a sleeping guest still meets its deadline.

    WASI's own `poll_oneoff` blocks inside the host where neither fuel nor epochs reach it, so a
    `time.sleep(3600)` would pin a worker for an hour. CPython sleeps until an absolute monotonic
    time, so the guest's clock has to be ours too. The host functions never raise (wasmtime-py
    keeps a host exception in a module-global slot, which concurrent runs would race on): at the
    deadline they set the store's epoch deadline to now, and the guest traps with INTERRUPT as soon
    as it is back in wasm.
    """

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop  # set at shutdown: every sleeper wakes and its run ends
        # A run executes wholly on one worker thread, and host calls come on that thread.
        self._local = threading.local()

    def install(self, linker: Linker) -> None:
        linker.allow_shadowing = True
        i32, i64 = ValType.i32(), ValType.i64()
        linker.define_func(
            _MODULE, "clock_time_get", FuncType([i32, i64, i32], [i32]), self._clock_time_get, access_caller=True
        )
        linker.define_func(
            _MODULE, "poll_oneoff", FuncType([i32, i32, i32, i32], [i32]), self._poll_oneoff, access_caller=True
        )

    @contextmanager
    def run(self, timeout_s: float) -> Iterator[None]:
        """Mark the calling thread as running a guest that must end `timeout_s` from now."""
        self._local.run = _Run(deadline=time.monotonic() + timeout_s, started_ns=time.monotonic_ns())
        try:
            yield
        finally:
            self._local.run = None

    def _current(self) -> _Run:
        run: _Run | None = getattr(self._local, "run", None)
        # A host call outside `run()` is a bug; an already-passed deadline ends the guest safely.
        return run or _Run(deadline=0.0, started_ns=time.monotonic_ns())

    def _clock_time_get(self, caller: Caller, clock_id: int, _precision: int, out_ptr: int) -> int:
        try:
            now = self._guest_time_ns(self._current(), clock_id)
            if now is None:
                return _ERRNO_INVAL
            return _write(caller, out_ptr, struct.pack("<Q", now))
        except Exception:
            _expire(caller)
            return _ERRNO_FAULT

    def _poll_oneoff(self, caller: Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int) -> int:
        try:
            return self._poll(caller, in_ptr & 0xFFFFFFFF, out_ptr & 0xFFFFFFFF, count, nevents_ptr & 0xFFFFFFFF)
        except Exception:
            _expire(caller)
            return _ERRNO_FAULT

    def _poll(self, caller: Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int) -> int:
        if not 0 < count <= _MAX_SUBSCRIPTIONS:
            return _ERRNO_INVAL
        memory = _memory(caller)
        if memory is None:
            return _ERRNO_FAULT
        raw = bytes(memory.read(caller, in_ptr, in_ptr + count * _SUBSCRIPTION_SIZE))
        if len(raw) != count * _SUBSCRIPTION_SIZE:
            return _ERRNO_FAULT
        run = self._current()
        now = time.monotonic()
        clocks: list[tuple[float, int]] = []  # (host wake time, userdata)
        ready: list[bytes] = []
        for offset in range(0, len(raw), _SUBSCRIPTION_SIZE):
            userdata, tag = _SUBSCRIPTION.unpack_from(raw, offset)
            if tag != _EVENTTYPE_CLOCK:
                # fd_read/fd_write: the guest's streams (memory sinks, files, no stdin) never
                # block, so they are ready at once, as wasmtime itself reports them.
                ready.append(_EVENT.pack(userdata, _ERRNO_SUCCESS, tag, 0, 0))
                continue
            clock_id, timeout, _precision, flags = _SUBSCRIPTION_CLOCK.unpack_from(raw, offset + 16)
            if flags & _SUBCLOCKFLAGS_ABSTIME:
                guest_now = self._guest_time_ns(run, clock_id)
                if guest_now is None:
                    return _ERRNO_INVAL
                timeout -= guest_now
            clocks.append((now + max(timeout, 0) / 1e9, userdata))
        if not ready and clocks:
            wake = min(at for at, _ in clocks)
            # A loop, because a timed wait may wake a hair early.
            while now < min(wake, run.deadline) and not self._stop.is_set():
                self._stop.wait(min(wake, run.deadline) - now)
                now = time.monotonic()
            if self._stop.is_set() or now >= run.deadline:
                _expire(caller)
                now = max(now, wake)  # report the sleep as over; the guest traps on its way back
        ready += [_EVENT.pack(data, _ERRNO_SUCCESS, _EVENTTYPE_CLOCK, 0, 0) for at, data in clocks if at <= now]
        status = _write(caller, out_ptr, b"".join(ready))
        if status != _ERRNO_SUCCESS:
            return status
        return _write(caller, nevents_ptr, struct.pack("<I", len(ready)))

    @staticmethod
    def _guest_time_ns(run: _Run, clock_id: int) -> int | None:
        if clock_id == _CLOCK_REALTIME:
            return time.time_ns()
        if clock_id in (_CLOCK_MONOTONIC, _CLOCK_PROCESS_CPU, _CLOCK_THREAD_CPU):
            # Starts near zero: the host's uptime is none of the guest's business.
            return time.monotonic_ns() - run.started_ns
        return None


def _memory(caller: Caller) -> Memory | None:
    memory = caller.get("memory")
    return memory if isinstance(memory, Memory) else None


def _write(caller: Caller, ptr: int, data: bytes) -> int:
    memory = _memory(caller)
    if memory is None:
        return _ERRNO_FAULT
    ptr &= 0xFFFFFFFF
    if ptr + len(data) > memory.data_len(caller):
        return _ERRNO_FAULT
    if data:
        memory.write(caller, data, ptr)
    return _ERRNO_SUCCESS


def _expire(caller: Caller) -> None:
    """End the run: its epoch deadline becomes now, so the guest traps on its next check."""
    ffi.wasmtime_context_set_epoch_deadline(caller._context(), 0)
