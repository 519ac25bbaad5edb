"""The retry policy: which upstream errors are retried, and the backoff before each retry."""

from __future__ import annotations

from typing import Any

import pytest

from app.enforcement.retry import RetryPolicy
from app.errors import (
    CircuitOpen,
    InvalidRequest,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)


class UpstreamTeapot(UpstreamError):
    """A 5xx kind the policy has never heard of."""


def policy(jitter: float = 1.0, **fields: Any) -> RetryPolicy:
    return RetryPolicy(random=lambda: jitter, **fields)


def delays(retry_policy: RetryPolicy, error: BaseException, attempts: int) -> list[float | None]:
    return [retry_policy.delay_before_retry(attempt, error) for attempt in range(1, attempts + 1)]


def test_backoff_doubles_per_attempt_up_to_max_delay() -> None:
    retry_policy = policy(1.0, max_retries=8, base_delay_s=0.2, max_delay_s=5.0)
    assert delays(retry_policy, UpstreamUnavailable(), 8) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_full_jitter_scales_the_whole_backoff() -> None:
    retry_policy = policy(0.5, max_retries=7, base_delay_s=0.2, max_delay_s=5.0)
    assert delays(retry_policy, UpstreamUnavailable(), 7) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5])


def test_jitter_can_make_a_retry_immediate() -> None:
    assert policy(0.0).delay_before_retry(2, UpstreamUnavailable()) == 0.0


@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailable(), UpstreamError("503 from upstream"), UpstreamRateLimited(), UpstreamTeapot()],
    ids=["connection", "5xx", "429", "unlisted-subclass"],
)
def test_connection_errors_5xx_and_rate_limits_back_off_exponentially(error: UpstreamError) -> None:
    assert delays(policy(1.0, max_retries=3), error, 3) == pytest.approx([0.2, 0.4, 0.8])


def test_retry_after_is_a_floor_under_the_backoff() -> None:
    retry_policy = policy(1.0, max_retries=5)
    assert retry_policy.delay_before_retry(1, UpstreamRateLimited(retry_after=3.0)) == pytest.approx(3.0)
    # A backoff already longer than Retry-After stands.
    assert retry_policy.delay_before_retry(4, UpstreamRateLimited(retry_after=1.0)) == pytest.approx(1.6)
    # Jitter never takes the delay below Retry-After.
    assert policy(0.0).delay_before_retry(1, UpstreamError(retry_after=2.0)) == pytest.approx(2.0)


def test_retry_after_up_to_max_retry_after_is_honoured_in_full() -> None:
    retry_policy = policy(1.0, max_retry_after_s=10.0)
    assert retry_policy.delay_before_retry(1, UpstreamRateLimited(retry_after=10.0)) == pytest.approx(10.0)


def test_retry_after_longer_than_max_retry_after_is_not_retried() -> None:
    retry_policy = policy(1.0, max_retry_after_s=10.0)
    assert retry_policy.delay_before_retry(1, UpstreamRateLimited(retry_after=10.5)) is None
    assert retry_policy.delay_before_retry(1, UpstreamUnavailable(retry_after=60.0)) is None


def test_timeouts_back_off_linearly_without_jitter() -> None:
    retry_policy = policy(0.0, max_retries=4, timeout_step_s=0.5)
    assert delays(retry_policy, UpstreamTimeout(), 4) == pytest.approx([0.5, 1.0, 1.5, 2.0])


@pytest.mark.parametrize(
    "error",
    [
        UpstreamRejected(),
        UpstreamAuthFailed(),
        UpstreamProtocolError(),
        InvalidRequest(),
        CircuitOpen(retry_after=1.0),
        TimeoutError(),
        ConnectionError(),
        ValueError("bug"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_non_retryable_errors_are_not_retried(error: BaseException) -> None:
    assert policy(1.0).delay_before_retry(1, error) is None


def test_gives_up_after_max_retries() -> None:
    assert delays(policy(1.0, max_retries=2), UpstreamUnavailable(), 3) == pytest.approx([0.2, 0.4, None])
    assert policy(1.0, max_retries=2).delay_before_retry(3, UpstreamTimeout()) is None
    assert policy(1.0, max_retries=0).delay_before_retry(1, UpstreamUnavailable()) is None


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        policy().delay_before_retry(0, UpstreamUnavailable())


def test_equality_and_repr_ignore_the_jitter_source() -> None:
    assert policy(0.1) == policy(0.9) == RetryPolicy()
    assert "random" not in repr(RetryPolicy())


def test_the_default_jitter_stays_within_the_backoff() -> None:
    retry_policy = RetryPolicy(max_retries=3)
    for _ in range(200):
        delay = retry_policy.delay_before_retry(3, UpstreamUnavailable())
        assert delay is not None and 0.0 <= delay <= 0.8


@pytest.mark.parametrize("fields", [{"max_retries": -1}, {"base_delay_s": -0.1}, {"max_retry_after_s": -1.0}])
def test_a_nonsensical_policy_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        RetryPolicy(**fields)
