"""Per-execution limits: what a request asks for, clamped by the settings' and the API key's maxima."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequest
from app.sandbox.settings import DEFAULT_MAX_OPEN_FILES, DEFAULT_MAX_WRITE_BYTES, SandboxSettings

# Below the guest's initial 10 MiB of linear memory instantiation fails; 16 leaves room to start.
MIN_MEMORY_MB = 16

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ExecutionLimits:
    timeout_s: float
    fuel: int
    memory_mb: int
    output_bytes: int
    # Not asked for per request: the deployment's settings decide them.
    max_open_files: int = DEFAULT_MAX_OPEN_FILES
    max_write_bytes: int = DEFAULT_MAX_WRITE_BYTES

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if self.fuel < 1:
            raise ValueError("fuel must be at least 1")
        if self.memory_mb < MIN_MEMORY_MB:
            raise ValueError(f"memory_mb must be at least {MIN_MEMORY_MB}")
        if self.output_bytes < 1:
            raise ValueError("output_bytes must be at least 1")
        if self.max_open_files < 1 or self.max_write_bytes < 1:
            raise ValueError("max_open_files and max_write_bytes must be at least 1")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * _MIB


_FIELDS: dict[str, type] = {"timeout_s": float, "fuel": int, "memory_mb": int, "output_bytes": int}


def resolve_limits(
    settings: SandboxSettings,
    requested: Mapping[str, Any] | None,
    key_max: ExecutionLimits | None,
) -> ExecutionLimits:
    """Each limit is the request's value (else the settings default), lowered to the tightest maximum.

    Asking for more than allowed is not an error: the caller gets the maximum, which the
    result's limits show. Unknown keys, wrong types and values below the floor are refused.
    """
    requested = requested or {}
    unknown = sorted(set(requested) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown sandbox limit(s): {', '.join(unknown)}")
    defaults: dict[str, float | int] = {
        "timeout_s": settings.timeout_s,
        "fuel": settings.fuel,
        "memory_mb": settings.memory_mb,
        "output_bytes": settings.output_bytes,
    }
    maxima: dict[str, float | int] = {
        "timeout_s": settings.max_timeout_s,
        "fuel": settings.max_fuel,
        "memory_mb": settings.max_memory_mb,
        "output_bytes": settings.max_output_bytes,
    }
    values: dict[str, float | int] = {}
    for name, kind in _FIELDS.items():
        value = requested.get(name, defaults[name])
        # bool is an int subclass; `"fuel": true` is a client bug, not one unit of fuel.
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and isinstance(value, float)):
            raise InvalidRequest(f"sandbox limit {name} must be {'an integer' if kind is int else 'a number'}")
        ceiling = maxima[name]
        if key_max is not None:
            ceiling = min(ceiling, getattr(key_max, name))
        values[name] = min(value, ceiling)
    try:
        return ExecutionLimits(
            timeout_s=float(values["timeout_s"]),
            fuel=int(values["fuel"]),
            memory_mb=int(values["memory_mb"]),
            output_bytes=int(values["output_bytes"]),
            max_open_files=settings.max_open_files,
            max_write_bytes=settings.max_write_bytes,
        )
    except ValueError as exc:
        raise InvalidRequest(f"invalid sandbox limits: {exc}") from None
