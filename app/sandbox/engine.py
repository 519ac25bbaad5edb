"""The loaded runtime: one Engine, the deserialized module, a linker with WASI and the guards, and the epoch ticker."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wasmtime import Engine, InstancePre, Linker, Module

from app.sandbox.exits import ExitGuard
from app.sandbox.guard import SleepGuard
from app.sandbox.module_cache import engine_config
from app.sandbox.quota import FileQuota


class WasmRuntime:
    """Everything shared by all executions; safe to use from many worker threads at once."""

    def __init__(self, artifact: Path, tick_ms: int) -> None:
        self.engine = Engine(engine_config())
        # mmap of the cached artifact: 0.5 ms and a few MiB, never a compile.
        module = Module.deserialize_file(self.engine, str(artifact))
        self.tick_s = tick_ms / 1000
        self.stopping = threading.Event()  # set at shutdown: no new runs, sleepers wake
        self.guard = SleepGuard(self.stopping)
        self.exits = ExitGuard()
        self.quota = FileQuota(self.engine)
        linker = Linker(self.engine)
        linker.define_wasi()
        self.guard.install(linker)
        self.exits.install(linker)
        self.quota.install(linker)
        # Imports are resolved once; each execution only instantiates (about 0.1 ms).
        self.pre: InstancePre = linker.instantiate_pre(module)
        self._longest_deadline = 0  # in ticks, for interrupt_all; updated from worker threads
        self._longest_lock = threading.Lock()
        self._ticker_stop = threading.Event()
        # The ticker only ticks while a guest runs: deadlines are set relative to the epoch when a run
        # starts, so an epoch that stands still in between changes none (and an idle server sleeps).
        self._running = 0
        self._running_lock = threading.Lock()
        self._guests = threading.Event()  # set while _running > 0, or to let the ticker out at close
        self._ticker = threading.Thread(target=self._tick, name="sandbox-epoch-ticker", daemon=True)

    def start(self) -> None:
        self._ticker.start()

    def interrupt_all(self) -> None:
        """End every run now: sleepers wake and expire, and busy guests pass their epoch deadline."""
        self.stopping.set()
        # Deadlines are relative, so moving the epoch past the longest one ends them all.
        for _ in range(self._longest_deadline + 1):
            self.engine.increment_epoch()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around one guest's run: the epoch ticks while any guest runs."""
        with self._running_lock:
            self._running += 1
            self._guests.set()
        try:
            yield
        finally:
            with self._running_lock:
                self._running -= 1
                if self._running == 0 and not self._ticker_stop.is_set():
                    self._guests.clear()

    def close(self) -> None:
        """Stop the ticker; call after the workers are done, or a late run would never time out."""
        self.stopping.set()
        self._ticker_stop.set()
        self._guests.set()
        if self._ticker.is_alive():
            self._ticker.join()

    def deadline_ticks(self, timeout_s: float) -> int:
        # Deadlines are relative to the engine's epoch when set, and the next tick may come at
        # once: one tick more means a run is never cut short, at worst one tick late.
        ticks = math.ceil(timeout_s / self.tick_s) + 1
        with self._longest_lock:
            self._longest_deadline = max(self._longest_deadline, ticks)
        return ticks

    def _tick(self) -> None:
        # One global ticker: epochs are per Engine, so a per-run timer would cut every run short.
        while True:
            self._guests.wait()
            if self._ticker_stop.wait(self.tick_s):
                return
            self.engine.increment_epoch()
