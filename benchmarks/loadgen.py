"""The closed-loop HTTP load generator the chat and enforcement benchmarks share, with its CPU accounting."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from benchmarks.harness import Child, machine_busy, own_cpu, percentile

REQUEST_TIMEOUT_S = 30.0  # no single request may hang a row longer than this

Valid = Callable[[int, bytes], bool]  # (HTTP status, body) -> whether the answer counts


@dataclass
class Window:
    """One closed-loop run: the requests that completed inside its measured window, and the CPU over it."""

    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    server_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # busy CPU of processes outside the benchmark

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.requests / self.window_s if self.window_s else float("nan")

    def percentile(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    @property
    def server_cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1000 / self.requests if self.requests else float("nan")

    def problems(self, label: str) -> list[str]:
        """What makes this run's figures meaningless: failed requests, none completed, a figure not computed."""
        found = [f"{label}: {sum(self.errors.values())} requests failed"] if self.errors else []
        if not self.requests:
            found.append(f"{label}: no request completed in the measured window")
        figures = {"p50": self.percentile(50), "p99": self.percentile(99), "CPU": self.server_cpu_ms_per_request}
        found += [f"{label}: {name} could not be computed" for name, value in figures.items() if math.isnan(value)]
        return found


@dataclass(frozen=True)
class _Snapshot:
    at: float
    server: float  # CPU seconds so far: the process under test,
    loadgen: float  # this process,
    ours: float  # every process of the benchmark,
    machine: float  # and the whole machine (busy time of all CPUs)

    @classmethod
    def take(cls, server: Child, children: Sequence[Child]) -> _Snapshot:
        loadgen, machine = own_cpu(), machine_busy()
        ours = loadgen + sum(c.cpu_seconds() for c in children if c.popen.poll() is None)
        return cls(time.perf_counter(), server.cpu_seconds(), loadgen, ours, machine)


W = TypeVar("W", bound=Window)


async def closed_loop(
    run: W,
    url: str,
    body: bytes,
    headers: dict[str, str],
    valid: Valid,
    concurrency: int,
    warmup_s: float,
    seconds: float,
    server: Child,
    children: Sequence[Child],
) -> W:
    """`concurrency` workers send back to back for warm-up + seconds; fills in `run` and returns it.

    Requests that complete inside the measured window count; CPU times (the server's, our own, and
    the machine's, to see other work that disturbed the row) are taken at the window's two ends.
    """
    begin = time.perf_counter()  # not loop.time(): uvloop's clock has millisecond steps
    window_start, window_end = begin + warmup_s, begin + warmup_s + seconds
    finished: list[tuple[float, float]] = []  # (completed at, latency ms)
    snapshots: list[_Snapshot] = []

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        snapshots.append(_Snapshot.take(server, children))
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        snapshots.append(_Snapshot.take(server, children))

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=["User-Agent"]) as http:

        async def worker() -> None:
            while (started := time.perf_counter()) < window_end:
                try:
                    async with http.post(url, data=body, headers=headers) as response:
                        content = await response.read()
                        ok = valid(response.status, content)
                        if not ok:
                            run.errors[f"HTTP {response.status}: {content[:160]!r}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    run.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                    ok = False
                    await asyncio.sleep(0.01)  # a refused connection must not spin
                if ok:
                    done = time.perf_counter()
                    finished.append((done, (done - started) * 1000))

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))

    first, last = snapshots
    run.window_s = last.at - first.at
    run.latencies_ms = [ms for done, ms in finished if first.at <= done <= last.at]
    run.server_cpu_s = last.server - first.server
    run.loadgen_cpu_s = last.loadgen - first.loadgen
    run.other_cpu_s = max(0.0, (last.machine - first.machine) - (last.ours - first.ours))
    return run


async def first_request(
    label: str, url: str, body: bytes, headers: dict[str, str], valid: Valid, server: Child
) -> None:
    """One request before any load: a broken setup fails here, with the server's log."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http,
        http.post(url, data=body, headers=headers) as response,
    ):
        content = await response.read()
        if not valid(response.status, content):
            raise RuntimeError(
                f"{label}: HTTP {response.status} {content[:300]!r}\n{server.name} log:\n{server.output()}"
            )
