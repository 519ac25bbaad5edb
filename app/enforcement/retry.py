"""Retry policy for upstream calls: which errors are worth another try, and how long to wait first."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from app.errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
)

# Retrying these sends the same request into the same answer: a 4xx, our refused credentials,
# or a malformed response (a bug, not a blip).
_NEVER_RETRIED: tuple[type[UpstreamError], ...] = (UpstreamRejected, UpstreamAuthFailed, UpstreamProtocolError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    timeout_step_s: float = 0.5
    max_retry_after_s: float = 10.0
    # Jitter source in [0, 1); injectable so tests are deterministic.
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if min(self.base_delay_s, self.max_delay_s, self.timeout_step_s, self.max_retry_after_s) < 0:
            raise ValueError("delays must not be negative")

    def delay_before_retry(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before retry number `attempt` (1 for the first), or None not to retry."""
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        if attempt > self.max_retries:
            return None
        if not isinstance(error, UpstreamError) or isinstance(error, _NEVER_RETRIED):
            return None
        if isinstance(error, UpstreamTimeout):
            # A timeout may mean a slow upstream, not a broken one: give it steadily more room.
            delay = self.timeout_step_s * attempt
        else:
            # Connection errors, 5xx and 429: full jitter spreads the retries of many callers.
            delay = self.random() * min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        if error.retry_after is None:
            return delay
        if error.retry_after > self.max_retry_after_s:
            return None  # the caller is better served by an error now than by a long wait
        # Never come back sooner than the upstream asked.
        return max(delay, error.retry_after)
