"""The `python` tool: runs the model's (or a client's) code in the WebAssembly sandbox."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from app.sandbox.limits import ExecutionLimits, resolve_limits
from app.sandbox.sandbox import Sandbox
from app.sandbox.settings import SandboxSettings
from app.tools.base import ModelTool, ToolContext, ToolError


def workspace_name(key_id: int | None, session_id: str) -> str:
    """The directory of a session's /workspace under sandbox.sessions_dir.

    Scoped to the key: another key naming the same session gets a workspace of its own.
    """
    return hashlib.sha256(f"{key_id}\0{session_id}".encode()).hexdigest()[:32]


class PythonArguments(BaseModel):
    code: str = Field(min_length=1, description="A Python 3.12 program; what it prints is the result.")
    timeout_s: float | None = Field(None, gt=0, description="Wall-clock limit (clamped to the allowed maximum).")
    memory_mb: int | None = Field(None, ge=16, description="Memory limit in MiB (clamped likewise).")
    fuel: int | None = Field(None, ge=1, description="CPU budget in wasm fuel units (clamped likewise).")


class PythonTool(ModelTool[PythonArguments]):
    name = "python"
    description = (
        "Runs a Python 3.12 program in an isolated sandbox (standard library only; no network, no "
        "subprocesses, no threads) and returns its stdout, stderr and exit code. Files written under "
        "/workspace persist across runs of the same session."
    )
    arguments_model = PythonArguments

    def __init__(self, sandbox: Sandbox, settings: SandboxSettings) -> None:
        self._sandbox = sandbox
        self._settings = settings
        self.timeout_s = settings.max_timeout_s + 5  # the sandbox enforces the real limit itself

    async def run(self, arguments: PythonArguments, context: ToolContext) -> dict[str, Any]:
        requested = {
            name: value
            for name, value in (
                ("timeout_s", arguments.timeout_s),
                ("memory_mb", arguments.memory_mb),
                ("fuel", arguments.fuel),
            )
            if value is not None
        }
        limits = resolve_limits(self._settings, requested, self._key_max(context))
        outcome = await self._sandbox.execute(arguments.code, limits, session_dir=self._workspace(context))
        result = {
            "status": outcome.status,
            "exit_code": outcome.exit_code,
            "stdout": outcome.stdout,
            "stderr": outcome.stderr,
            "stdout_truncated": outcome.stdout_truncated,
            "stderr_truncated": outcome.stderr_truncated,
            "duration_ms": outcome.duration_ms,
        }
        if outcome.code is not None:
            # The caller gets both: the stable code as the error, and what the program left behind.
            raise ToolError(outcome.code, result=result)
        return result

    def _key_max(self, context: ToolContext) -> ExecutionLimits | None:
        own = context.sandbox_max
        if not own:
            return None
        settings = self._settings
        return ExecutionLimits(
            timeout_s=float(own.get("timeout_s", settings.max_timeout_s)),
            fuel=int(own.get("fuel", settings.max_fuel)),
            memory_mb=int(own.get("memory_mb", settings.max_memory_mb)),
            output_bytes=settings.max_output_bytes,
        )

    def _workspace(self, context: ToolContext) -> Path | None:
        if context.session_id is None:
            return None
        return self._sandbox.session_dir(workspace_name(context.key_id, context.session_id))
