"""The Sandbox: owns the runtime, a bounded worker pool and admission; `execute()` is its async API.

`start()` verifies the runtime and builds the module cache (so a bad runtime still stops the app);
the runtime itself (wasmtime, the mapped module, the linker, the epoch ticker and the workers) is
loaded by the first execution, so that a server whose requests never run code does not carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from app.observability import tracing
from app.sandbox.errors import SandboxBusy, SandboxSetupError, SandboxUnavailable
from app.sandbox.limits import ExecutionLimits
from app.sandbox.module_cache import CompiledModule, ensure_compiled
from app.sandbox.result import ExecutionResult
from app.sandbox.settings import MIB, SandboxSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from app.sandbox.engine import WasmRuntime

log = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Sandbox:
    """Runs untrusted Python in WebAssembly; the app's lifespan calls `start()` and `close()`."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.startup: CompiledModule | None = None  # how the last start() found the module cache
        self.load_s: float | None = None  # how long the first execution took to load the runtime
        self._started = False
        self._loaded: WasmRuntime | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._load_lock = threading.Lock()  # one load, whichever thread (or the event loop) asks first
        self._admitted = 0  # running + waiting for a worker, until the worker is truly done
        self._admitted_lock = threading.Lock()  # released from pool threads
        # One run at a time per session: the workspace rollback compares before and after.
        self._session_locks: weakref.WeakValueDictionary[Path, asyncio.Lock] = weakref.WeakValueDictionary()

    @property
    def capacity(self) -> int:
        return self.settings.workers + self.settings.queue_limit

    @property
    def admitted(self) -> int:
        return self._admitted

    async def start(self) -> CompiledModule:
        """Verify the runtime and build the module cache if needed (in a subprocess); the first execution loads it."""
        if self._started:
            raise RuntimeError("the sandbox is already started")
        # Off the event loop: hashing takes tens of ms, and a cold compile seconds.
        self.startup = await asyncio.to_thread(ensure_compiled, self.settings, load=False)
        self._started = True
        return self.startup

    @property
    def loaded(self) -> bool:
        """Whether an execution has loaded the runtime (wasmtime, the module, the ticker, the workers)."""
        return self._loaded is not None

    @property
    def _runtime(self) -> WasmRuntime | None:
        """The loaded runtime, loaded now if need be (blocking); None when not started or closed."""
        if not self._started:
            return None
        return self._load()

    def _load(self) -> WasmRuntime:
        """Load the runtime once: import wasmtime, map the module, link it, start the ticker and the workers."""
        with self._load_lock:
            if self._loaded is not None:
                return self._loaded
            assert self.startup is not None
            began = time.monotonic()
            from app.sandbox.engine import WasmRuntime  # wasmtime: only once code is to run

            try:
                runtime = WasmRuntime(self.startup.path, self.settings.tick_ms)
            except Exception as exc:  # a WasmtimeError: the cached file passed its digest yet does not load
                log.warning("the sandbox module %s does not load (%s): checking it again", self.startup.path, exc)
                self.startup = ensure_compiled(self.settings)  # loads it, and rebuilds it if it does not
                runtime = WasmRuntime(self.startup.path, self.settings.tick_ms)
            runtime.start()
            self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="sandbox-worker")
            self._loaded = runtime
            self.load_s = time.monotonic() - began
            log.info("sandbox runtime loaded on first use in %.0f ms", self.load_s * 1000)
            return runtime

    async def _ensure_loaded(self) -> tuple[WasmRuntime, ThreadPoolExecutor]:
        runtime, pool = self._loaded, self._pool
        if runtime is None or pool is None:
            try:
                # Off the event loop: importing wasmtime and linking take tens of ms.
                await asyncio.to_thread(self._load)
            except (SandboxSetupError, OSError) as exc:
                log.error("the sandbox runtime could not be loaded: %s", exc)
                raise SandboxUnavailable("the sandbox runtime could not be loaded") from None
            runtime, pool = self._loaded, self._pool
            if not self._started or runtime is None or pool is None:  # closed while it loaded
                await self.close()
                raise SandboxUnavailable("the sandbox shut down before this execution started")
        return runtime, pool

    async def close(self) -> None:
        """End running guests at once, drop queued ones, stop the workers and the ticker."""
        self._started = False
        with self._load_lock:  # a load in progress finishes first, and is closed here
            runtime, pool = self._loaded, self._pool
            self._loaded = self._pool = None
        if runtime is None or pool is None:
            return
        runtime.interrupt_all()
        # The ticker outlives the workers, so a run that slipped past interrupt_all still times out.
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        runtime.close()

    def session_dir(self, session_id: str) -> Path:
        """The persistent /workspace of a session (created empty on first use)."""
        if not _SESSION_ID.fullmatch(session_id):
            raise ValueError("a session id is 1-64 letters, digits, '-' or '_'")
        path = self.settings.sessions_dir.resolve() / session_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def execute(self, code: str, limits: ExecutionLimits, *, session_dir: Path | None = None) -> ExecutionResult:
        """Run `code` as a Python program under `limits`; raises SandboxBusy when the queue is full."""
        if tracing.TRACER is not None:
            attributes = {
                "pacemaker.sandbox.timeout_s": limits.timeout_s,
                "pacemaker.sandbox.memory_mb": limits.memory_mb,
            }
            run = self._execute(code, limits, session_dir)
            return await tracing.traced("sandbox run", run, attributes, after=_ran)
        return await self._execute(code, limits, session_dir)

    async def _execute(self, code: str, limits: ExecutionLimits, session_dir: Path | None) -> ExecutionResult:
        source = code.encode("utf-8", errors="surrogatepass")
        if len(source) > self.settings.max_code_bytes:
            return ExecutionResult(
                status="code_too_large",
                exit_code=None,
                stdout="",
                stderr=f"the code is {len(source)} bytes; the limit is {self.settings.max_code_bytes}",
            )
        if not self._started:
            raise SandboxUnavailable()
        self._admit()
        try:
            runtime, pool = await self._ensure_loaded()
            future, lock = await self._submit(pool, runtime, source, limits, session_dir)
        except BaseException:
            self._release()
            raise
        # What loop.run_in_executor does, but keeping the pool's future: its done-callbacks free
        # the slot (and the session) when the worker really finishes or the queued job is
        # dropped, even if the awaiting task was cancelled: cancelling does not stop a guest.
        future.add_done_callback(self._release)
        if lock is not None:
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _done: _release_on(loop, lock))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and task.cancelling() == 0:
                # Nobody cancelled us: close() dropped the job before a worker took it.
                raise SandboxUnavailable("the sandbox shut down before this execution started") from None
            raise

    def _admit(self) -> None:
        with self._admitted_lock:
            if self._admitted >= self.capacity:
                raise SandboxBusy(f"{self._admitted} executions running or queued; the limit is {self.capacity}")
            self._admitted += 1

    def _release(self, _future: object = None) -> None:
        with self._admitted_lock:
            self._admitted -= 1

    async def _submit(
        self,
        pool: ThreadPoolExecutor,
        runtime: WasmRuntime,
        source: bytes,
        limits: ExecutionLimits,
        session_dir: Path | None,
    ) -> tuple[Future[ExecutionResult], asyncio.Lock | None]:
        lock = None
        if session_dir is not None:
            # Keyed by the path as given: pass the one session_dir() returns (already resolved).
            lock = self._session_locks.setdefault(session_dir, asyncio.Lock())
            await lock.acquire()
        cap = self.settings.session_workspace_mb * MIB
        from app.sandbox.runner import run_execution  # imported by the load, with wasmtime

        try:
            return pool.submit(run_execution, runtime, source, limits, session_dir, cap), lock
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if isinstance(exc, RuntimeError):  # the pool shut down after execute() looked
                raise SandboxUnavailable() from None
            raise


def _ran(span: Span, result: ExecutionResult) -> None:
    span.set_attribute("pacemaker.sandbox.status", result.status)
    if result.exit_code is not None:
        span.set_attribute("pacemaker.sandbox.exit_code", result.exit_code)
    if result.code is not None:
        tracing.failed(span, result.code)


def _release_on(loop: asyncio.AbstractEventLoop, lock: asyncio.Lock) -> None:
    """Release an asyncio lock from a pool thread (a no-op once the loop is gone)."""
    # A closed event loop raises RuntimeError: then nobody is left waiting on the lock.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(lock.release)
