"""Circuit breakers: stop calling an upstream or tool that keeps failing, then probe it back to health."""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.errors import AppError, CircuitOpen, UpstreamError, UpstreamRejected
from app.tools.base import ToolError, ToolUnavailable

Clock = Callable[[], float]
OnChange = Callable[[str, "BreakerState"], None]

# The window is counted in this many time buckets (1 s each for a 30 s window): memory is bounded
# by the window, not by the traffic.
_BUCKETS = 30
# A caller refused while a probe is in flight should come back soon: the probe settles in one call.
_HALF_OPEN_RETRY_AFTER_S = 1.0


class BreakerState(enum.IntEnum):
    """A breaker's state; the values are what the Prometheus gauge reports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_rate_threshold: float = 0.5  # open when failures / calls in the window >= this
    window_s: float = 30.0  # how far back outcomes count
    min_calls: int = 10  # a few unlucky calls on a quiet dependency must not open it
    open_s: float = 30.0  # how long an open breaker refuses before it lets a probe through
    half_open_probes: int = 1  # calls allowed in flight while half-open

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError("failure_rate_threshold must be in (0, 1]")
        if self.window_s <= 0 or self.open_s <= 0:
            raise ValueError("window_s and open_s must be positive")
        if self.min_calls < 1 or self.half_open_probes < 1:
            raise ValueError("min_calls and half_open_probes must be at least 1")


def classify(error: BaseException) -> Literal["failure", "ignored"]:
    """Whether an error counts against the dependency's health ("failure") or says nothing about it."""
    if not isinstance(error, Exception):
        # Cancellation (a client went away) and interpreter exit are not the dependency's doing.
        return "ignored"
    if isinstance(error, AppError) and error.capacity_refusal:
        return "ignored"  # busy or limited on our side: the dependency was never asked
    if isinstance(error, UpstreamRejected):
        return "ignored"  # the upstream answered and judged this request: it is up
    if isinstance(error, UpstreamError):
        # 5xx, 429, timeouts, unreadable replies, and our refused credentials: none is the caller's fault.
        return "failure"
    if isinstance(error, ToolUnavailable):
        return "failure"
    if isinstance(error, ToolError):
        return "ignored"  # bad arguments or a refused input: the caller's fault, not the tool's
    if isinstance(error, AppError) and error.status < 500:
        return "ignored"
    return "failure"


@dataclass(slots=True)
class _Bucket:
    index: int  # floor(time / bucket width)
    calls: int = 0
    failures: int = 0


class CircuitBreaker:
    """Counts recent outcomes of calls to one dependency and refuses calls while it is failing.

    Bracket every call: `before_call()` first (it raises `CircuitOpen`), then exactly one of
    `record_success()`, `record_failure()` or `record_ignored()` when the call ends (see `classify`).
    No method awaits, so each runs whole on the event loop and concurrent coroutines see
    consistent state. Outcomes are not tied to the call that produced them: while half-open, an
    outcome arriving while a probe is in flight is taken as the probe's, and outcomes arriving
    while open (from calls admitted before it opened) are dropped.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Clock = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._bucket_s = config.window_s / _BUCKETS
        self._buckets: deque[_Bucket] = deque()
        self._calls = 0  # totals over self._buckets, kept so a check never sums the window
        self._failures = 0

    @property
    def state(self) -> BreakerState:
        # An open breaker whose open_s has passed still reads OPEN until a call probes it.
        return self._state

    def open_remaining(self) -> float:
        """Seconds an open breaker still refuses before it lets a probe through (0 unless open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_s - self._clock())

    def before_call(self) -> None:
        """Admit a call, or raise `CircuitOpen` with how long to wait."""
        if self._state is BreakerState.CLOSED:
            return
        if self._state is BreakerState.OPEN:
            remaining = self._opened_at + self.config.open_s - self._clock()
            if remaining > 0:
                raise CircuitOpen(f"{self.name} is failing; calls are paused", retry_after=remaining)
            self._transition(BreakerState.HALF_OPEN)
        if self._probes_in_flight >= self.config.half_open_probes:
            raise CircuitOpen(
                f"{self.name} is being probed after failing; calls are paused",
                retry_after=_HALF_OPEN_RETRY_AFTER_S,
            )
        self._probes_in_flight += 1

    def record_success(self) -> None:
        if self._state is BreakerState.CLOSED:
            self._count(failed=False)
        elif self._state is BreakerState.HALF_OPEN and self._probes_in_flight:
            self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        if self._state is BreakerState.CLOSED:
            self._count(failed=True)
            if (
                self._calls >= self.config.min_calls
                and self._failures / self._calls >= self.config.failure_rate_threshold
            ):
                self._transition(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN and self._probes_in_flight:
            self._transition(BreakerState.OPEN)

    def record_ignored(self) -> None:
        """The call ended in the caller's own error: count nothing, but free its probe slot."""
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1

    def _count(self, *, failed: bool) -> None:
        index = int(self._clock() // self._bucket_s)
        self._evict_before(index - _BUCKETS + 1)
        # A clock that steps back (not a monotonic one) lands in the newest bucket.
        if not self._buckets or self._buckets[-1].index < index:
            self._buckets.append(_Bucket(index))
        bucket = self._buckets[-1]
        bucket.calls += 1
        self._calls += 1
        if failed:
            bucket.failures += 1
            self._failures += 1

    def _evict_before(self, oldest_index: int) -> None:
        while self._buckets and self._buckets[0].index < oldest_index:
            old = self._buckets.popleft()
            self._calls -= old.calls
            self._failures -= old.failures

    def _transition(self, state: BreakerState) -> None:
        # Every field is settled before on_change runs, so the hook sees a consistent breaker.
        self._state = state
        self._probes_in_flight = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        # Closing starts a fresh window; opening drops one that will not be read again.
        self._buckets.clear()
        self._calls = self._failures = 0
        if self._on_change is not None:
            self._on_change(self.name, state)


class BreakerRegistry:
    """One breaker per protected name (a provider/model or a tool), created on first use."""

    def __init__(self, config: BreakerConfig, clock: Clock = time.monotonic, on_change: OnChange | None = None) -> None:
        self.config = config
        self._clock = clock
        self._on_change = on_change
        # Bounded: names come from configuration (models and tools), never from requests.
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, self.config, self._clock, self._on_change)
            self._breakers[name] = breaker
        return breaker

    def all(self) -> list[CircuitBreaker]:
        return list(self._breakers.values())

    def states(self) -> dict[str, BreakerState]:
        return {name: breaker.state for name, breaker in self._breakers.items()}
