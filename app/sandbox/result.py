"""What an execution returns: a status (the stable error code), the exit code and the captured output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal[
    "ok",
    "error",  # the program failed: non-zero exit (an uncaught exception exits with 1)
    "sandbox_timeout",  # wall-clock deadline (epoch), sleeping or busy
    "sandbox_cpu_limit",  # fuel exhausted
    "sandbox_memory_limit",  # the linear-memory cap refused an allocation and the program died of it
    "sandbox_output_limit",  # stdout or stderr reached its cap; what came before is kept
    "sandbox_file_limit",  # the program tried to hold more than max_open_files open at once
    "sandbox_disk_limit",  # the program tried to write past max_write_bytes (scratch and workspace together)
    "sandbox_workspace_limit",  # the session workspace would outgrow its cap; this run's changes were undone
    "code_too_large",  # refused before running
]


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    status: Status
    # The status the program exited with, as a signed 32-bit value (no truncation to a byte: 256 is
    # 256); None when the guest did not exit by itself (a trap, a limit) or never ran.
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float = 0.0  # the run on its worker, setup and cleanup included; queueing excluded
    # Fuel burned; None after a timeout, where wasmtime's counter is stale.
    fuel_used: int | None = None
    # Set whenever the workspace outgrew its cap, even if another limit decided the status.
    workspace_exceeded: bool = False

    @property
    def code(self) -> str | None:
        """None for a clean run, else the status: the stable error code the API reports."""
        return None if self.status == "ok" else self.status
