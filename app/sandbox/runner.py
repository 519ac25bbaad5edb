"""One execution, synchronously on a worker thread: workdir, WASI config, store limits, run, outcome."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wasmtime import Func, Memory, Store, Trap, TrapCode, WasiConfig, WasmtimeError

from app.sandbox.engine import WasmRuntime
from app.sandbox.errors import SandboxUnavailable
from app.sandbox.hostcall import cause
from app.sandbox.limits import ExecutionLimits
from app.sandbox.quota import FileLedger
from app.sandbox.result import ExecutionResult, Status
from app.sandbox.workspace import remove_tree, roll_back, scan

log = logging.getLogger(__name__)

# -u: output written before a trap is not lost in the guest's buffers.
ARGV = ["python", "-u", "/main.py"]
# Preopened in this order, which gives them quota.SCRATCH_FD and quota.WORKSPACE_FD.
SCRATCH_MOUNT, WORKSPACE_MOUNT = "/", "/workspace"


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
    runtime_error: str | None = None  # what a WasmtimeError that ended the guest says went wrong


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
    before, before_size = scan(session_dir) if session_dir is not None else ({}, 0)
    ledger = FileLedger(
        max_open_files=limits.max_open_files,
        max_write_bytes=limits.max_write_bytes,
        workspace=session_dir,
        workspace_cap=workspace_cap_bytes,
        workspace_size=before_size,
    )
    workdir = Path(tempfile.mkdtemp(prefix="pacemaker-sandbox-"))
    try:
        (workdir / "main.py").write_bytes(source)
        with runtime.running():
            outcome = _run_guest(runtime, workdir, limits, ledger, stdout, stderr)
    finally:
        _remove_workdir(workdir)
    workspace_exceeded = False
    # The quota stops a run at the cap; the scan afterwards is the backstop for anything it missed.
    if session_dir is not None and (
        ledger.verdict == "sandbox_workspace_limit" or scan(session_dir)[1] > workspace_cap_bytes
    ):
        roll_back(session_dir, before)
        workspace_exceeded = True
    status = _status(outcome, ledger, stdout, stderr, workspace_exceeded)
    return ExecutionResult(
        status=status,
        exit_code=outcome.exit_code,
        stdout=stdout.text(),
        stderr=_with_note(stderr.text(), _note(status, outcome, limits, workspace_cap_bytes)),
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
    ledger: FileLedger,
    stdout: _CappedSink,
    stderr: _CappedSink,
) -> _Outcome:
    wasi = WasiConfig()
    wasi.argv = ARGV
    wasi.env = [("PYTHONIOENCODING", "utf-8")]  # nothing of the host's environment
    # At "/", so cwd, relative paths and tempfile all land in the throwaway workdir.
    wasi.preopen_dir(str(workdir), SCRATCH_MOUNT)
    if ledger.workspace is not None:
        wasi.preopen_dir(str(ledger.workspace), WORKSPACE_MOUNT)
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
        runtime_error: str | None = None
        with runtime.guard.run(limits.timeout_s), runtime.exits.run() as exit_record:
            instance = runtime.pre.instantiate(store)
            exports = instance.exports(store)
            entry, memory = exports["_start"], exports["memory"]
            # A WASI command always exports both.
            assert isinstance(entry, Func) and isinstance(memory, Memory)
            with runtime.quota.run(store, memory, ledger):
                try:
                    entry(store)
                    exit_code = 0
                except Trap as exc:
                    trap = exc.trap_code
                except WasmtimeError as exc:
                    # What the runtime refuses mid-run is the program's failure, not ours. The guards'
                    # own traps (an exit, a limit) come back this way too, and say so below.
                    runtime_error = cause(exc)
        if exit_record.status is not None:
            exit_code, trap, runtime_error = exit_record.status, None, None  # proc_exit's way out
        elif ledger.verdict is not None:
            runtime_error = None  # the quota ended the run, and the status says which limit
        at_cap = memory.data_len(store) + _GROWTH_SLACK > limits.memory_bytes
        return _Outcome(
            exit_code=exit_code,
            trap=trap,
            memory_at_cap=at_cap,
            fuel_left=store.get_fuel(),
            runtime_error=runtime_error,
        )
    finally:
        # Promptly: a Store still holding a stdout_custom at interpreter exit makes Rust panic.
        store.close()


# dlmalloc grows in steps; within this of the cap, a failed allocation was the cap's doing.
_GROWTH_SLACK = 16 * 1024 * 1024


def _status(
    outcome: _Outcome, ledger: FileLedger, stdout: _CappedSink, stderr: _CappedSink, workspace_exceeded: bool
) -> Status:
    if ledger.verdict is not None:
        return ledger.verdict
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


def _note(status: Status, outcome: _Outcome, limits: ExecutionLimits, workspace_cap_bytes: int) -> str:
    """One line for stderr saying which limit ended the run, so the program's author can tell."""
    if status == "sandbox_file_limit":
        return f"[sandbox] ended: more than {limits.max_open_files} files open at once (sandbox_file_limit)"
    if status == "sandbox_disk_limit":
        return f"[sandbox] ended: this run may write at most {limits.max_write_bytes} bytes (sandbox_disk_limit)"
    if status == "sandbox_workspace_limit":
        return (
            f"[sandbox] ended: /workspace may hold at most {workspace_cap_bytes} bytes; this run's changes "
            "to it were undone (sandbox_workspace_limit)"
        )
    if status == "error" and outcome.runtime_error is not None:
        return f"[sandbox] the WebAssembly runtime ended the program: {outcome.runtime_error}"
    return ""


def _with_note(text: str, note: str) -> str:
    if not note:
        return text
    separator = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{separator}{note}\n"


def _died_of_memory(outcome: _Outcome, stderr: _CappedSink) -> bool:
    lines = stderr.text().rstrip().splitlines()
    last = lines[-1] if lines else ""
    # CPython turns a refused memory.grow into MemoryError; an abort at the cap is a trap instead.
    return last.startswith("MemoryError") or (outcome.trap is not None and outcome.memory_at_cap)


def _remove_workdir(workdir: Path) -> None:
    # remove_tree never follows the symlinks a guest may have left pointing outside, and copes with
    # any depth of directories; a failure is logged, not raised: the run's outcome stands.
    try:
        remove_tree(workdir)
    except OSError:
        log.warning("sandbox workdir cleanup failed for %s", workdir, exc_info=True)
