"""A WebAssembly sandbox (wasmtime + CPython for WASI) that runs untrusted Python under hard limits."""

from app.sandbox.errors import SandboxBusy, SandboxSetupError, SandboxUnavailable
from app.sandbox.limits import ExecutionLimits, resolve_limits
from app.sandbox.module_cache import CompiledModule, ensure_compiled
from app.sandbox.result import ExecutionResult, Status
from app.sandbox.sandbox import Sandbox
from app.sandbox.settings import SandboxSettings

__all__ = [
    "CompiledModule",
    "ExecutionLimits",
    "ExecutionResult",
    "Sandbox",
    "SandboxBusy",
    "SandboxSettings",
    "SandboxSetupError",
    "SandboxUnavailable",
    "Status",
    "ensure_compiled",
    "resolve_limits",
]
