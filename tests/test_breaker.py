"""The circuit breaker: every transition, its rolling window and probe accounting, on a fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.enforcement.breaker import BreakerConfig, BreakerRegistry, BreakerState, CircuitBreaker, classify
from app.errors import (
    AppError,
    Cancelled,
    CircuitOpen,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ToolNotAllowed,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.tools.base import ToolError, ToolUnavailable


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, BreakerState]] = []

    def __call__(self, name: str, state: BreakerState) -> None:
        self.changes.append((name, state))


def make_breaker(clock: FakeClock, on_change: Recorder | None = None, **config: Any) -> CircuitBreaker:
    return CircuitBreaker("openai/gpt-test", BreakerConfig(**config), clock=clock, on_change=on_change)


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure()


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_success()


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(100):
        if breaker.state is not BreakerState.CLOSED:
            break
        fail(breaker)
    assert breaker.state is BreakerState.OPEN


def refusal(breaker: CircuitBreaker) -> CircuitOpen:
    with pytest.raises(CircuitOpen) as caught:
        breaker.before_call()
    return caught.value


def test_state_values_are_the_prometheus_gauge_values() -> None:
    assert [int(s) for s in (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)] == [0, 1, 2]


def test_stays_closed_below_min_calls_even_when_every_call_fails() -> None:
    breaker = make_breaker(FakeClock(), min_calls=10)
    fail(breaker, 9)
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()  # still admitted


def test_opens_when_the_failure_rate_reaches_the_threshold() -> None:
    recorder = Recorder()
    breaker = make_breaker(FakeClock(), recorder, min_calls=10, failure_rate_threshold=0.5)
    succeed(breaker, 5)
    fail(breaker, 4)
    assert recorder.changes == []  # 4 / 9: below min_calls and below the rate
    fail(breaker)
    assert recorder.changes == [("openai/gpt-test", BreakerState.OPEN)]  # 5 / 10 == 0.5


def test_stays_closed_while_the_failure_rate_is_below_the_threshold() -> None:
    breaker = make_breaker(FakeClock(), min_calls=10, failure_rate_threshold=0.5)
    for _ in range(20):
        succeed(breaker, 2)
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_ignored_outcomes_count_neither_as_calls_nor_as_successes() -> None:
    recorder = Recorder()
    breaker = make_breaker(FakeClock(), recorder, min_calls=10)
    for _ in range(50):
        breaker.before_call()
        breaker.record_ignored()
    fail(breaker, 9)
    assert recorder.changes == []  # the ignored calls did not make up the volume
    fail(breaker)
    assert recorder.changes == [("openai/gpt-test", BreakerState.OPEN)]  # nor did they dilute the rate


def test_open_refuses_with_retry_after_equal_to_the_remaining_open_time() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0)
    open_breaker(breaker)
    error = refusal(breaker)
    assert error.retry_after == pytest.approx(30.0)
    assert error.status == 503 and error.code == "circuit_open"
    assert "openai/gpt-test" in error.detail
    clock.advance(10.0)
    assert refusal(breaker).retry_after == pytest.approx(20.0)
    clock.advance(19.5)
    assert refusal(breaker).retry_after == pytest.approx(0.5)
    assert breaker.state is BreakerState.OPEN


def test_moves_to_half_open_after_open_s_and_admits_a_probe() -> None:
    clock = FakeClock()
    recorder = Recorder()
    breaker = make_breaker(clock, recorder, open_s=30.0)
    open_breaker(breaker)
    clock.advance(30.0)
    assert breaker.state is BreakerState.OPEN  # nothing has probed it yet
    breaker.before_call()
    assert recorder.changes[-1] == ("openai/gpt-test", BreakerState.HALF_OPEN)


def test_a_failed_probe_reopens_for_a_full_open_s() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0)
    open_breaker(breaker)
    clock.advance(45.0)
    breaker.before_call()
    clock.advance(2.0)  # the probe took a while
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert refusal(breaker).retry_after == pytest.approx(30.0)


def test_a_successful_probe_closes_and_starts_a_fresh_window() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0, min_calls=10)
    open_breaker(breaker)
    clock.advance(30.0)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 9)  # the failures that opened it are forgotten
    assert breaker.state is BreakerState.CLOSED


def test_refuses_probes_beyond_half_open_probes_while_they_are_in_flight() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0, half_open_probes=2)
    open_breaker(breaker)
    clock.advance(30.0)
    breaker.before_call()
    breaker.before_call()
    error = refusal(breaker)
    assert error.retry_after == pytest.approx(1.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_record_ignored_releases_the_probe_slot_and_stays_half_open() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0, half_open_probes=1)
    open_breaker(breaker)
    clock.advance(30.0)
    breaker.before_call()
    refusal(breaker)
    breaker.record_ignored()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()  # the slot is free again
    refusal(breaker)


def test_outcomes_while_open_from_calls_admitted_earlier_change_nothing() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0, min_calls=10)
    for _ in range(12):  # twelve calls in flight when the breaker opens
        breaker.before_call()
    for _ in range(10):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    breaker.record_failure()  # does not extend the open period
    breaker.record_success()  # and does not close it
    assert breaker.state is BreakerState.OPEN
    assert refusal(breaker).retry_after == pytest.approx(25.0)


def test_outcomes_in_half_open_with_no_probe_in_flight_change_nothing() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0)
    open_breaker(breaker)
    clock.advance(30.0)
    breaker.before_call()
    breaker.record_ignored()
    breaker.record_failure()  # a straggler admitted before the breaker opened
    breaker.record_success()
    assert breaker.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize(
    ("seconds_ago", "state"),
    [(40.0, BreakerState.CLOSED), (20.0, BreakerState.OPEN)],
    ids=["40s-ago-fell-out", "20s-ago-still-counts"],
)
def test_outcomes_older_than_the_window_fall_out(seconds_ago: float, state: BreakerState) -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, window_s=30.0, min_calls=10)
    fail(breaker, 9)
    clock.advance(seconds_ago)
    fail(breaker)
    assert breaker.state is state


def test_window_memory_is_bounded_whatever_the_traffic() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, window_s=30.0, failure_rate_threshold=1.0)
    for _ in range(3000):  # ten calls a second for five minutes
        clock.advance(0.1)
        succeed(breaker)
    assert len(breaker._buckets) <= 30


def test_on_change_is_called_with_each_transition() -> None:
    clock = FakeClock()
    recorder = Recorder()
    breaker = make_breaker(clock, recorder, open_s=30.0)
    succeed(breaker, 3)
    assert recorder.changes == []  # counting outcomes is not a transition
    open_breaker(breaker)
    clock.advance(30.0)
    breaker.before_call()
    breaker.record_failure()
    clock.advance(30.0)
    breaker.before_call()
    breaker.record_success()
    name = "openai/gpt-test"
    assert recorder.changes == [
        (name, BreakerState.OPEN),
        (name, BreakerState.HALF_OPEN),
        (name, BreakerState.OPEN),
        (name, BreakerState.HALF_OPEN),
        (name, BreakerState.CLOSED),
    ]


async def test_probe_accounting_stays_consistent_across_interleaved_coroutines() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, open_s=30.0, half_open_probes=2)
    open_breaker(breaker)
    clock.advance(30.0)
    in_flight = peak = refused = 0

    async def call() -> None:
        nonlocal in_flight, peak, refused
        try:
            breaker.before_call()
        except CircuitOpen:
            refused += 1
            return
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        breaker.record_ignored()

    for _ in range(5):
        await asyncio.gather(*(call() for _ in range(20)))
    assert peak == 2 and refused == 5 * 18
    assert breaker.state is BreakerState.HALF_OPEN
    # Every slot was given back: exactly two probes are admitted again.
    breaker.before_call()
    breaker.before_call()
    refusal(breaker)


@pytest.mark.parametrize(
    "config",
    [
        {"failure_rate_threshold": 0.0},
        {"failure_rate_threshold": 1.5},
        {"window_s": 0.0},
        {"open_s": -1.0},
        {"min_calls": 0},
        {"half_open_probes": 0},
    ],
)
def test_a_nonsensical_config_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        BreakerConfig(**config)


def test_registry_creates_one_breaker_per_name_and_reports_their_states() -> None:
    clock = FakeClock()
    recorder = Recorder()
    registry = BreakerRegistry(BreakerConfig(min_calls=1), clock=clock, on_change=recorder)
    model = registry.get("openai/gpt-test")
    assert registry.get("openai/gpt-test") is model
    registry.get("calculator")
    fail(model)
    assert registry.states() == {"openai/gpt-test": BreakerState.OPEN, "calculator": BreakerState.CLOSED}
    assert recorder.changes == [("openai/gpt-test", BreakerState.OPEN)]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (UpstreamError("502 from upstream"), "failure"),
        (UpstreamUnavailable(), "failure"),
        (UpstreamTimeout(), "failure"),
        (UpstreamRateLimited(retry_after=3), "failure"),
        (UpstreamProtocolError(), "failure"),
        (UpstreamAuthFailed(), "failure"),  # our misconfiguration: not the caller's fault
        (UpstreamRejected(), "ignored"),  # the upstream's 4xx for this request
        (TimeoutError(), "failure"),
        (RequestTimeout(), "failure"),
        (Overloaded(), "ignored"),  # our own capacity refusal: the dependency was never asked
        (ToolUnavailable("backend down"), "failure"),
        (ConnectionResetError(), "failure"),
        (RuntimeError("bug"), "failure"),
        (AppError(), "failure"),
        (InvalidRequest(), "ignored"),
        (ToolNotAllowed(), "ignored"),
        (ToolError("invalid arguments for calculator: expression: field required"), "ignored"),
        (Cancelled(), "ignored"),
        (asyncio.CancelledError(), "ignored"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_classify_counts_only_faults_of_the_dependency(error: BaseException, kind: str) -> None:
    assert classify(error) == kind
