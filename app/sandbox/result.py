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
    "sandbox_workspace_limit",  # the session workspace outgrew its cap; this run's changes were undone
    "code_too_large",  # refused before running
]


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    status: Status
    exit_code: int | None  # None when the guest did not exit by itself (trap) or never ran
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
