"""SandboxSettings: the `sandbox:` section of the settings (limits, pool size, cache and session paths)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1024 * 1024
DEFAULT_MAX_OPEN_FILES = 256
DEFAULT_MAX_WRITE_BYTES = 64 * MIB


class SandboxSettings(BaseModel):
    # A misspelt setting is an error, not silently ignored (the `_Section` style of app.config).
    model_config = ConfigDict(extra="forbid")

    cache_dir: Path = Path("var/sandbox-cache")
    # The GIL is released inside wasm, so one thread per core scales (research section 2).
    workers: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1)
    queue_limit: int = Field(16, ge=0, description="Executions allowed to wait for a worker; beyond: sandbox_busy.")
    timeout_s: float = Field(10.0, gt=0)
    max_timeout_s: float = Field(60.0, gt=0)
    # Fuel burns at 5-15 G per second of guest CPU here (measured): the default leaves the wall-clock
    # timeout to decide for ordinary code, while still bounding CPU. Startup alone costs 0.25 G.
    fuel: int = Field(100_000_000_000, ge=1)
    max_fuel: int = Field(900_000_000_000, ge=1)
    # The guest's initial linear memory is 10 MiB: a smaller cap makes instantiation fail.
    memory_mb: int = Field(256, ge=16)
    max_memory_mb: int = Field(1024, ge=16, le=4096)
    output_bytes: int = Field(MIB, ge=1, description="Per stream (stdout, stderr), per execution.")
    max_output_bytes: int = Field(8 * MIB, ge=1)
    # 1.3 MB of source costs the guest about 2 s and 170 MB just to compile.
    max_code_bytes: int = Field(200_000, ge=1)
    # Every guest descriptor is a host descriptor, and the process has a limit for all of them.
    max_open_files: int = Field(DEFAULT_MAX_OPEN_FILES, ge=1, description="Files one execution may hold open.")
    max_write_bytes: int = Field(
        DEFAULT_MAX_WRITE_BYTES,
        ge=1,
        description="Bytes one execution may write, scratch and workspace together (4 KiB per new entry).",
    )
    session_workspace_mb: int = Field(50, ge=1)
    sessions_dir: Path = Path("var/sandbox-sessions")
    tick_ms: int = Field(10, ge=1, le=1000, description="Epoch ticker period: the timeout resolution.")

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> SandboxSettings:
        for default, maximum in (
            ("timeout_s", "max_timeout_s"),
            ("fuel", "max_fuel"),
            ("memory_mb", "max_memory_mb"),
            ("output_bytes", "max_output_bytes"),
        ):
            if getattr(self, default) > getattr(self, maximum):
                raise ValueError(f"{default} must not exceed {maximum}")
        return self
