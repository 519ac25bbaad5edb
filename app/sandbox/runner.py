"""One execution, synchronously on a worker thread: workdir, WASI config, store limits, run, outcome."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wasmtime import ExitTrap, Func, Memory, Store, Trap, TrapCode, WasiConfig

from app.sandbox.engine import WasmRuntime
from app.sandbox.errors import SandboxUnavailable
from app.sandbox.limits import ExecutionLimits
from app.sandbox.result import ExecutionResult, Status
from app.sandbox.workspace import roll_back, scan

log = logging.getLogger(__name__)

# -u: output written before a trap is not lost in the guest's buffers.
ARGV = ["python", "-u", "/main.py"]
WORKSPACE_MOUNT = "/workspace"


class _CappedSink:
    """stdout_custom target: keeps output up to its cap, then fails the guest's writes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def __call__(self, data: bytes) -> int | None:
        room = self.cap - self.size
        if len(data) <= room:
            self.parts.append(data)
            self.size += len(data)
            return None
        if room > 0:
            self.parts.append(data[:room])
            self.size = self.cap
        self.truncated = True
        # A negative count fails the write (EPERM in the guest): a flood stops within milliseconds.
        return -1

    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8", errors="replace")


@dataclass(slots=True)
class _Outcome:
    exit_code: int | None
    trap: TrapCode | None
    memory_at_cap: bool
    fuel_left: int


def run_execution(
    runtime: WasmRuntime,
    source: bytes,
    limits: ExecutionLimits,
    session_dir: Path | None,
    workspace_cap_bytes: int,
) -> ExecutionResult:
    """Run `source` as /main.py in a fresh workdir (and the session's /workspace), then clean up."""
    if runtime.stopping.is_set():
        raise SandboxUnavailable("the sandbox is shutting down")
    if session_dir is not None and (session_dir.is_symlink() or not session_dir.is_dir()):
        raise ValueError(f"session_dir {session_dir} is not a directory")
    started = time.monotonic()
    stdout, stderr = _CappedSink(limits.output_bytes), _CappedSink(limits.output_bytes)
    before = scan(session_dir)[0] if session_dir is not None else None
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-sandbox-"))
    try:
        (workdir / "main.py").write_bytes(source)
        outcome = _run_guest(runtime, workdir, limits, session_dir, stdout, stderr)
    finally:
        # rmtree never follows the symlinks a guest may have left pointing outside.
        shutil.rmtree(workdir, onerror=_log_cleanup_error)
    workspace_exceeded = False
    if session_dir is not None and before is not None and scan(session_dir)[1] > workspace_cap_bytes:
        roll_back(session_dir, before)
        workspace_exceeded = True
    status = _status(outcome, stdout, stderr, workspace_exceeded)
    return ExecutionResult(
        status=status,
        exit_code=outcome.exit_code,
        stdout=stdout.text(),
        stderr=stderr.text(),
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        duration_ms=(time.monotonic() - started) * 1000,
        fuel_used=None if outcome.trap == TrapCode.INTERRUPT else limits.fuel - outcome.fuel_left,
        workspace_exceeded=workspace_exceeded,
    )


def _run_guest(
    runtime: WasmRuntime,
    workdir: Path,
    limits: ExecutionLimits,
    session_dir: Path | None,
    stdout: _CappedSink,
    stderr: _CappedSink,
) -> _Outcome:
    wasi = WasiConfig()
    wasi.argv = ARGV
    wasi.env = [("PYTHONIOENCODING", "utf-8")]  # nothing of the host's environment
    # At "/", so cwd, relative paths and tempfile all land in the throwaway workdir.
    wasi.preopen_dir(str(workdir), "/")
    if session_dir is not None:
        wasi.preopen_dir(str(session_dir), WORKSPACE_MOUNT)
    wasi.stdout_custom = stdout
    wasi.stderr_custom = stderr
    store = Store(runtime.engine)
    try:
        store.set_wasi(wasi)
        store.set_limits(memory_size=limits.memory_bytes)
        store.set_fuel(limits.fuel)
        store.set_epoch_deadline(runtime.deadline_ticks(limits.timeout_s))
        exit_code: int | None = None
        trap: TrapCode | None = None
        with runtime.guard.run(limits.timeout_s):
            instance = runtime.pre.instantiate(store)
            exports = instance.exports(store)
            entry = exports["_start"]
            assert isinstance(entry, Func)  # a WASI command always exports a _start function
            try:
                entry(store)
                exit_code = 0
            except ExitTrap as exc:
                exit_code = exc.code
            except Trap as exc:
                trap = exc.trap_code
        memory = exports["memory"]
        at_cap = isinstance(memory, Memory) and memory.data_len(store) + _GROWTH_SLACK > limits.memory_bytes
        return _Outcome(exit_code=exit_code, trap=trap, memory_at_cap=at_cap, fuel_left=store.get_fuel())
    finally:
        # Promptly: a Store still holding a stdout_custom at interpreter exit makes Rust panic.
        store.close()


# dlmalloc grows in steps; within this of the cap, a failed allocation was the cap's doing.
_GROWTH_SLACK = 16 * 1024 * 1024


def _status(outcome: _Outcome, stdout: _CappedSink, stderr: _CappedSink, workspace_exceeded: bool) -> Status:
    if outcome.trap == TrapCode.OUT_OF_FUEL:
        return "sandbox_cpu_limit"
    if outcome.trap == TrapCode.INTERRUPT:
        return "sandbox_timeout"
    if stdout.truncated or stderr.truncated:
        return "sandbox_output_limit"
    if outcome.exit_code != 0 and _died_of_memory(outcome, stderr):
        return "sandbox_memory_limit"
    if workspace_exceeded:
        return "sandbox_workspace_limit"
    return "ok" if outcome.exit_code == 0 else "error"


def _died_of_memory(outcome: _Outcome, stderr: _CappedSink) -> bool:
    lines = stderr.text().rstrip().splitlines()
    last = lines[-1] if lines else ""
    # CPython turns a refused memory.grow into MemoryError; an abort at the cap is a trap instead.
    return last.startswith("MemoryError") or (outcome.trap is not None and outcome.memory_at_cap)


def _log_cleanup_error(_function: object, path: str, _excinfo: object) -> None:
    log.warning("sandbox workdir cleanup failed for %s", path)
