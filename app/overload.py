"""Load shedding: refuse new work early while the event loop lags or the process is too large.

In an asyncio server the honest sign of overload is the event loop: a callback that is ready
waits behind all the others, so every request slows at once. A sampler sleeps a fixed interval
and records how late it woke; while the p90 of the last second's samples (robust to one garbage
collection or one slow callback, not to a loop that stays busy) is above
`server.shed_loop_lag_ms`, or the resident set is above `server.shed_rss_mb`, admission refuses
new tasks, chat completions and tool calls with `503 overloaded`. Work already admitted goes on;
health, readiness and metrics are never shed. The sampler runs with shedding off too: its gauge
is how operators choose the threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable

from app.errors import Overloaded
from app.observability.metrics import Metrics

log = logging.getLogger(__name__)

SAMPLE_S = 0.025  # 40 samples a second
WINDOW_S = 1.0
RSS_EVERY_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_rss_bytes() -> int | None:
    """The resident set from /proc (Linux); None elsewhere, where RSS shedding cannot work."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class LoadShedder:
    """Samples the loop's lag and the RSS; `refusal()` is what admission asks (None: admit)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_loop_lag_ms: float | None,
        max_rss_mb: float | None,
        rss: Callable[[], int | None] = read_rss_bytes,
    ) -> None:
        self._metrics = metrics
        self._max_lag_s = max_loop_lag_ms / 1000 if max_loop_lag_ms is not None else None
        self._max_rss = int(max_rss_mb * 1024 * 1024) if max_rss_mb is not None else None
        self._rss = rss
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag)
        self.loop_lag_s = 0.0  # p90 of the last second's samples
        self.rss_bytes: int | None = None
        self.reason: str | None = None  # "loop_lag" or "rss" while shedding
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._max_rss is not None and self._rss() is None:
            log.warning("server.shed_rss_mb is set, but this platform has no /proc/self/statm: RSS is not checked")
        self._task = asyncio.create_task(self._sample(), name="load-shedder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def refusal(self) -> Overloaded | None:
        reason = self.reason
        if reason is None:
            return None
        self._metrics.shed_requests.labels(reason).inc()
        if reason == "rss":
            detail = "This instance is above its memory threshold; send the request again shortly."
        else:
            detail = "This instance is overloaded; send the request again shortly (another instance may take it)."
        return Overloaded(detail, retry_after=1.0)

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        next_rss = 0.0
        while True:
            started = loop.time()
            await asyncio.sleep(SAMPLE_S)
            now = loop.time()
            if now >= next_rss:
                next_rss = now + RSS_EVERY_S
                self.refresh_rss()
            self.observe(now, now - started - SAMPLE_S)

    def refresh_rss(self) -> None:
        self.rss_bytes = self._rss()

    def observe(self, now: float, lag_s: float) -> None:
        """Record one sample and decide (the sampler's samples; tests feed their own)."""
        samples = self._samples
        samples.append((now, max(lag_s, 0.0)))
        while samples and samples[0][0] < now - WINDOW_S:
            samples.popleft()
        lags = sorted(lag for _, lag in samples)
        self.loop_lag_s = lags[int(len(lags) * 0.9)] if len(lags) > 1 else lags[0]
        self._metrics.loop_lag.set(self.loop_lag_s)
        self._decide()

    def _decide(self) -> None:
        reason: str | None = None
        if self._max_lag_s is not None and self.loop_lag_s > self._max_lag_s:
            reason = "loop_lag"
        elif self._max_rss is not None and self.rss_bytes is not None and self.rss_bytes > self._max_rss:
            reason = "rss"
        if reason != self.reason:
            if reason is None:
                log.info("load shedding stopped (loop lag %.0f ms)", self.loop_lag_s * 1000)
            else:
                log.warning(
                    "load shedding started: %s (loop lag %.0f ms, RSS %s MB)",
                    reason,
                    self.loop_lag_s * 1000,
                    f"{self.rss_bytes / 1048576:.0f}" if self.rss_bytes is not None else "?",
                )
            self.reason = reason
            self._metrics.shedding.set(0 if reason is None else 1)
