"""The file quota: WASI's file functions, shadowed to cap a run's open files, bytes written and workspace growth."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from wasmtime import Caller, Engine, Func, FuncType, Linker, Memory, Module, Store, ValType

from app.sandbox.hostcall import EndRun, RawArgs, RawFunc, RawMemory, define_raw, new_trap
from app.sandbox.result import Status
from app.sandbox.workspace import ENTRY_COST, scan

_MODULE = "wasi_snapshot_preview1"
# WASI preview1 values (wasi_snapshot_preview1 witx).
_SUCCESS, _FAULT, _INVAL, _XDEV = 0, 21, 28, 75
_OFLAGS_CREAT, _OFLAGS_TRUNC = 1, 8
_FDFLAGS_APPEND = 1
_FILETYPE_REGULAR = 4
_FILESTAT = struct.Struct("<QQB7xQQQQQ")  # dev, ino, filetype, nlink, size, atim, mtim, ctim: 64 bytes
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_IOVEC_SIZE = 8  # buf, buf_len: two u32
_IOV_MAX = 1024  # POSIX's bound on one writev; more is EINVAL there too
_U64_MASK = (1 << 64) - 1

# wasmtime numbers descriptors 0-2 for stdio, then the preopens in the order given: the runner
# preopens the scratch directory first and the session workspace second.
SCRATCH_FD, WORKSPACE_FD = 3, 4

# Shadowed on the guest's linker, and forwarded to WASI's own through the forwarding shim, by
# name: parameter kinds ("i" i32, "I" i64); each returns an errno.
_SHADOWED = {
    "path_open": "iiiiiIIii",  # dirfd, lookupflags, path, path_len, oflags, rights, inheriting, fdflags, out fd
    "fd_close": "i",
    "fd_renumber": "ii",
    "fd_fdstat_set_flags": "ii",  # fd, fdflags: may turn append on or off
    "fd_write": "iiii",  # fd, iovs, iovs_len, out nwritten
    "fd_pwrite": "iiiIi",  # fd, iovs, iovs_len, offset, out nwritten
    "fd_filestat_set_size": "iI",
    "fd_allocate": "iII",  # fd, offset, len
    "path_create_directory": "iii",
    "path_symlink": "iiiii",  # old path, old len, dirfd, new path, new len
    "path_link": "iiiiiii",  # old dirfd, lookupflags, old path, old len, new dirfd, new path, new len
    "path_rename": "iiiiii",  # old dirfd, old path, old len, new dirfd, new path, new len
    "path_unlink_file": "iii",
    "path_remove_directory": "iii",
}
# What the quota asks for itself, through the probe shim, whose results land in its own page.
_PROBES = {"fd_filestat_get": "ii", "fd_tell": "ii", "path_filestat_get": "iiiii"}
_PROBE_PATH_AT = 64  # in the probe page: results at 0, a copied path from here to the end
_PROBE_PAGE = 65536


def _shim_wat(functions: dict[str, str], own_memory: bool) -> str:
    """A module whose exports call WASI's own functions, so that they find a "memory" to work on.

    WASI functions reach memory through their caller's "memory" export, and a call made from the
    host has no caller instance ("missing required memory export"). Called through a shim, they
    use the shim's: the guest's memory, imported and re-exported, for forwarded calls; one page of
    its own for probes (that shim has no imports but WASI's, so it is pre-instantiated).
    """
    kinds = {"i": "i32", "I": "i64"}
    lines = ["(module", "" if own_memory else '(import "env" "memory" (memory 0))']
    for name, params in functions.items():
        types = " ".join(kinds[kind] for kind in params)
        lines.append(f'(import "{_MODULE}" "{name}" (func ${name} (param {types}) (result i32)))')
    lines.append('(memory (export "memory") 1 1)' if own_memory else '(export "memory" (memory 0))')
    for name, params in functions.items():
        types = " ".join(kinds[kind] for kind in params)
        body = " ".join(f"local.get {index}" for index in range(len(params)))
        lines.append(f'(func (export "{name}") (param {types}) (result i32) {body} call ${name})')
    return "\n".join(lines) + ")"


def _func_type(params: str) -> FuncType:
    return FuncType([ValType.i64() if kind == "I" else ValType.i32() for kind in params], [ValType.i32()])


@dataclass(slots=True)
class _Handle:
    in_workspace: bool  # the session workspace's preopen, or opened under it
    opened: bool  # by the guest's path_open (counts against max_open_files), not a preopen
    # Kept here rather than asked for on each write: fd_fdstat_get costs about 40 µs (wasmtime runs
    # file calls on a blocking thread), fd_tell about 2.
    append: bool = False


@dataclass(slots=True)
class FileLedger:
    """A run's file budget and its use so far; `verdict` says which limit ended the run, if one did."""

    max_open_files: int
    max_write_bytes: int  # data written, growth by truncate/allocate, and ENTRY_COST per new entry
    workspace: Path | None = None
    workspace_cap: int = 0
    # The workspace's size in scan()'s measure: at least what it is now (every growth is counted,
    # nothing given back), and exact after a re-scan.
    workspace_size: int = 0
    open_files: int = 0
    written: int = 0
    verdict: Status | None = None
    # Something in the workspace was removed, truncated or renamed since it was last measured, so
    # a re-scan may find room that workspace_size does not show.
    workspace_shrunk: bool = False
    handles: dict[int, _Handle] = field(default_factory=dict)


class _Run:
    """One run's ledger, its guest memory and the shim functions, used from that run's host calls."""

    def __init__(
        self,
        ledger: FileLedger,
        memory: Memory,
        probe_memory: Memory,
        forward: dict[str, RawFunc],
        probe: dict[str, RawFunc],
    ) -> None:
        self.ledger = ledger
        self.memory = RawMemory(memory)
        self.probe_memory = RawMemory(probe_memory)
        self._forward = forward
        self.probe = probe

    def forward(self, caller: Caller, name: str, args: RawArgs) -> int:
        """WASI's own function, with the guest's arguments as they came."""
        return self._forward[name].forward(caller, args)

    def end(self, verdict: Status) -> NoReturn:
        """End the run now: the guest's call traps, and the verdict says why."""
        self.ledger.verdict = verdict
        raise EndRun(new_trap(verdict))

    def in_workspace(self, fd: int) -> bool:
        handle = self.ledger.handles.get(fd)
        if handle is None:
            # Not a directory we know, so the call fails anyway; if not, count it both ways.
            return self.ledger.workspace is not None
        return handle.in_workspace

    def track(self, fd: int, handle: _Handle) -> None:
        self.untrack(fd)
        self.ledger.handles[fd] = handle
        if handle.opened:
            self.ledger.open_files += 1

    def untrack(self, fd: int) -> _Handle | None:
        handle = self.ledger.handles.pop(fd, None)
        if handle is not None and handle.opened:
            self.ledger.open_files -= 1
        return handle

    def admit(self, volume: int, workspace_growth: int) -> None:
        """Refuse (by ending the run) an operation that would take the run past a cap."""
        ledger = self.ledger
        if workspace_growth and ledger.workspace_size + workspace_growth > ledger.workspace_cap:
            if ledger.workspace_shrunk and ledger.workspace is not None:
                # Deleted and truncated files give their room back; only a scan knows how much.
                ledger.workspace_size = scan(ledger.workspace)[1]
                ledger.workspace_shrunk = False
            if ledger.workspace_size + workspace_growth > ledger.workspace_cap:
                self.end("sandbox_workspace_limit")
        if ledger.written + volume > ledger.max_write_bytes:
            self.end("sandbox_disk_limit")

    def charge(self, volume: int, workspace_growth: int) -> None:
        self.ledger.written += volume
        self.ledger.workspace_size += workspace_growth

    def read_u32(self, caller: Caller, ptr: int) -> int | None:
        raw = self.memory.read(caller, ptr, 4)
        return None if raw is None else int(_U32.unpack(raw)[0])

    def requested_bytes(self, caller: Caller, iovs: int, count: int) -> int | None:
        """What a write asks to write (the sum of its buffers), or None when the iovecs are out of bounds."""
        raw = self.memory.read(caller, iovs, count * _IOVEC_SIZE)
        if raw is None:
            return None
        return sum(int(_U32.unpack_from(raw, offset + 4)[0]) for offset in range(0, len(raw), _IOVEC_SIZE))

    def file_stat(self, caller: Caller, fd: int) -> tuple[int, int, int, int]:
        """errno, filetype, nlink and size of an open descriptor."""
        errno = self.probe["fd_filestat_get"](caller, fd, 0)
        return (errno, *self._filestat(caller))

    def path_stat(self, caller: Caller, dirfd: int, flags: int, path: int, path_len: int) -> tuple[int, int, int, int]:
        """errno, filetype, nlink and size of a path (the guest's bytes, copied into the probe page)."""
        length = path_len & 0xFFFFFFFF
        name = self.memory.read(caller, path, length) if length <= _PROBE_PAGE - _PROBE_PATH_AT else None
        if name is None or not self.probe_memory.write(caller, _PROBE_PATH_AT, name):
            return _FAULT, 0, 0, 0
        errno = self.probe["path_filestat_get"](caller, dirfd, flags, _PROBE_PATH_AT, length, 0)
        return (errno, *self._filestat(caller))

    def _filestat(self, caller: Caller) -> tuple[int, int, int]:
        _dev, _ino, filetype, nlink, size, *_times = _FILESTAT.unpack(self._probed(caller, _FILESTAT.size))
        return filetype, nlink, size

    def _probed(self, caller: Caller, size: int) -> bytes:
        return self.probe_memory.read(caller, 0, size) or bytes(size)

    def position(self, caller: Caller, fd: int) -> tuple[int, int]:
        errno = self.probe["fd_tell"](caller, fd, 0)
        return errno, int(_U64.unpack(self._probed(caller, _U64.size))[0])


class FileQuota:
    """Shadows the WASI functions that open descriptors or grow the disk, and counts them per run.

    Every guest descriptor from path_open is a real host descriptor, and every byte it writes lands
    on the host's disk: left alone, one guest reached 19,977 descriptors (the process limit is
    20,000) and another wrote 2 GB in 7 s. Each shadowing function checks the run's ledger before
    the call, ends the run (a trap, with the ledger's verdict saying why) when the call would pass a
    cap, and otherwise forwards to WASI's own function through the shim. stdout and stderr are the
    runner's capped sinks and go straight through.
    """

    def __init__(self, engine: Engine) -> None:
        self._local = threading.local()  # a run executes wholly on one worker thread
        self._callbacks: list[object] = []
        self._engine = engine
        # A few hundred bytes of wasm each: compiling them here costs about 5 ms once, and 6 MiB of
        # RSS that is the compiler's code pages of libwasmtime (file-backed; the heap does not grow).
        self._forwarding = Module(engine, _shim_wat(_SHADOWED, own_memory=False))
        wasi = Linker(engine)
        wasi.define_wasi()
        self._probing = wasi.instantiate_pre(Module(engine, _shim_wat(_PROBES, own_memory=True)))

    def install(self, linker: Linker) -> None:
        linker.allow_shadowing = True
        for name, params in _SHADOWED.items():
            handler = getattr(self, f"_{name}")
            self._callbacks.append(define_raw(linker, _MODULE, name, _func_type(params), handler))

    @contextmanager
    def run(self, store: Store, memory: Memory, ledger: FileLedger) -> Iterator[FileLedger]:
        """Count the calling thread's guest (instantiated in `store`, with `memory`) against `ledger`."""
        ledger.handles[SCRATCH_FD] = _Handle(in_workspace=False, opened=False)
        if ledger.workspace is not None:
            ledger.handles[WORKSPACE_FD] = _Handle(in_workspace=True, opened=False)
        # The guest's memory is the store's own, so this shim is linked per run: about 0.15 ms.
        linker = Linker(self._engine)
        linker.define_wasi()
        linker.define(store, "env", "memory", memory)
        forwarding = linker.instantiate(store, self._forwarding).exports(store)
        probing = self._probing.instantiate(store).exports(store)
        probe_memory = probing["memory"]
        if not isinstance(probe_memory, Memory):
            raise TypeError("the probe shim exports its memory")
        self._local.run = _Run(
            ledger,
            memory,
            probe_memory,
            {name: _raw(forwarding[name], params) for name, params in _SHADOWED.items()},
            {name: _raw(probing[name], params) for name, params in _PROBES.items()},
        )
        try:
            yield ledger
        finally:
            self._local.run = None

    def _current(self) -> _Run:
        run: _Run | None = getattr(self._local, "run", None)
        if run is None:
            raise EndRun(new_trap("a file call outside a sandbox run"))  # a bug: end the guest safely
        if run.ledger.verdict is not None:
            raise EndRun(new_trap(run.ledger.verdict))  # already over a cap: nothing more gets through
        return run

    # Descriptors.

    def _path_open(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        dirfd, lookupflags, path, path_len, oflags = (args[index].i32 for index in range(5))
        if run.ledger.open_files >= run.ledger.max_open_files:
            run.end("sandbox_file_limit")
        in_workspace = run.in_workspace(dirfd)
        creates = False
        if oflags & _OFLAGS_CREAT:
            errno = run.path_stat(caller, dirfd, lookupflags, path, path_len)[0]
            creates = errno != _SUCCESS  # not only NOENT: when in doubt, count the entry
            if creates:
                run.admit(ENTRY_COST, ENTRY_COST if in_workspace else 0)
        errno = run.forward(caller, "path_open", args)
        if errno == _SUCCESS:
            opened = run.read_u32(caller, args[8].i32)
            if opened is not None:
                append = bool(args[7].i32 & _FDFLAGS_APPEND)
                run.track(opened, _Handle(in_workspace=in_workspace, opened=True, append=append))
            if creates:
                run.charge(ENTRY_COST, ENTRY_COST if in_workspace else 0)
            if in_workspace and oflags & _OFLAGS_TRUNC and not creates:
                run.ledger.workspace_shrunk = True
        return errno

    def _fd_close(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        errno = run.forward(caller, "fd_close", args)
        if errno == _SUCCESS:
            run.untrack(args[0].i32)
        return errno

    def _fd_renumber(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        source, target = args[0].i32, args[1].i32
        errno = run.forward(caller, "fd_renumber", args)
        if errno == _SUCCESS and source != target:
            run.untrack(target)  # the descriptor that was there is closed
            moved = run.untrack(source)
            if moved is not None:
                run.track(target, moved)
        return errno

    def _fd_fdstat_set_flags(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        errno = run.forward(caller, "fd_fdstat_set_flags", args)
        handle = run.ledger.handles.get(args[0].i32)
        if errno == _SUCCESS and handle is not None:
            handle.append = bool(args[1].i32 & _FDFLAGS_APPEND)
        return errno

    # Data.

    def _fd_write(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        if args[0].i32 not in run.ledger.handles:
            return run.forward(caller, "fd_write", args)  # stdout, stderr, or not a descriptor
        return self._write(run, caller, args, "fd_write", offset=None, nwritten_ptr=args[3].i32)

    def _fd_pwrite(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        if args[0].i32 not in run.ledger.handles:
            return run.forward(caller, "fd_pwrite", args)
        return self._write(run, caller, args, "fd_pwrite", offset=args[3].i64 & _U64_MASK, nwritten_ptr=args[4].i32)

    def _write(self, run: _Run, caller: Caller, args: RawArgs, name: str, offset: int | None, nwritten_ptr: int) -> int:
        fd, count = args[0].i32, args[2].i32 & 0xFFFFFFFF
        if count > _IOV_MAX:
            return _INVAL
        requested = run.requested_bytes(caller, args[1].i32, count)
        if requested is None:
            return _FAULT
        start = size = nlink = 0
        handle = run.ledger.handles[fd]
        in_workspace = handle.in_workspace
        if in_workspace:
            # The workspace is measured by apparent size, so a write far past the end of a file
            # counts for the hole it makes; each hard link of the file counts it again.
            errno, _filetype, nlink, size = run.file_stat(caller, fd)
            if errno != _SUCCESS:
                return errno
            if handle.append:
                start = size  # wasmtime appends even for pwrite on an append descriptor
            elif offset is not None:
                start = offset
            else:
                errno, start = run.position(caller, fd)
                if errno != _SUCCESS:
                    return errno
        run.admit(requested, max(0, start + requested - size) * nlink)
        errno = run.forward(caller, name, args)
        if errno == _SUCCESS:
            # wasmtime writes only the first non-empty buffer: count what was written.
            written = run.read_u32(caller, nwritten_ptr) or 0
            run.charge(written, max(0, start + written - size) * nlink if in_workspace else 0)
        return errno

    def _fd_filestat_set_size(self, caller: Caller, args: RawArgs) -> int:
        return self._resize(caller, args, "fd_filestat_set_size", args[1].i64 & _U64_MASK)

    def _fd_allocate(self, caller: Caller, args: RawArgs) -> int:
        return self._resize(caller, args, "fd_allocate", (args[1].i64 & _U64_MASK) + (args[2].i64 & _U64_MASK))

    def _resize(self, caller: Caller, args: RawArgs, name: str, new_size: int) -> int:
        run = self._current()
        handle = run.ledger.handles.get(args[0].i32)
        if handle is None:
            return run.forward(caller, name, args)
        errno, _filetype, nlink, size = run.file_stat(caller, args[0].i32)
        if errno != _SUCCESS:
            return errno
        growth = max(0, new_size - size)
        # A sparse 10 GB file costs no disk, but it is 10 GB in a workspace and to whoever copies it.
        workspace_growth = growth * nlink if handle.in_workspace else 0
        run.admit(growth, workspace_growth)
        errno = run.forward(caller, name, args)
        if errno == _SUCCESS:
            run.charge(growth, workspace_growth)
            if handle.in_workspace and new_size < size:
                run.ledger.workspace_shrunk = True
        return errno

    # Directory entries: each costs ENTRY_COST, as workspace.scan() counts it.

    def _path_create_directory(self, caller: Caller, args: RawArgs) -> int:
        return self._new_entry(caller, args, "path_create_directory", dirfd=args[0].i32)

    def _path_symlink(self, caller: Caller, args: RawArgs) -> int:
        return self._new_entry(caller, args, "path_symlink", dirfd=args[2].i32)

    def _new_entry(self, caller: Caller, args: RawArgs, name: str, dirfd: int) -> int:
        run = self._current()
        workspace_growth = ENTRY_COST if run.in_workspace(dirfd) else 0
        run.admit(ENTRY_COST, workspace_growth)
        errno = run.forward(caller, name, args)
        if errno == _SUCCESS:
            run.charge(ENTRY_COST, workspace_growth)
        return errno

    def _path_link(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        old_dirfd, new_dirfd = args[0].i32, args[4].i32
        in_workspace = run.in_workspace(new_dirfd)
        if run.in_workspace(old_dirfd) != in_workspace:
            # Two devices to the guest, so nothing enters the workspace without being counted.
            return _XDEV
        workspace_growth = 0
        if in_workspace:
            errno, filetype, _nlink, size = run.path_stat(caller, old_dirfd, args[1].i32, args[2].i32, args[3].i32)
            if errno != _SUCCESS:
                return errno
            # scan() counts the new name at the file's full size, like any other.
            workspace_growth = max(size, ENTRY_COST) if filetype == _FILETYPE_REGULAR else ENTRY_COST
        run.admit(ENTRY_COST, workspace_growth)
        errno = run.forward(caller, "path_link", args)
        if errno == _SUCCESS:
            run.charge(ENTRY_COST, workspace_growth)
        return errno

    def _path_rename(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        in_workspace = run.in_workspace(args[3].i32)
        if run.in_workspace(args[0].i32) != in_workspace:
            return _XDEV
        return self._shrinking(run, caller, args, "path_rename", in_workspace)

    def _path_unlink_file(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        return self._shrinking(run, caller, args, "path_unlink_file", run.in_workspace(args[0].i32))

    def _path_remove_directory(self, caller: Caller, args: RawArgs) -> int:
        run = self._current()
        return self._shrinking(run, caller, args, "path_remove_directory", run.in_workspace(args[0].i32))

    def _shrinking(self, run: _Run, caller: Caller, args: RawArgs, name: str, in_workspace: bool) -> int:
        errno = run.forward(caller, name, args)
        if errno == _SUCCESS and in_workspace:
            run.ledger.workspace_shrunk = True
        return errno


def _raw(func: object, params: str) -> RawFunc:
    if not isinstance(func, Func):
        raise TypeError("the shim exports functions")
    return RawFunc(func, params)
