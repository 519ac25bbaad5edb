"""An in-process Limiter: exact token buckets and budgets per key, for one instance or as the Redis fallback."""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from app.enforcement.limits import (
    Admission,
    BudgetPeriod,
    LimitSpec,
    Reason,
    bucket_state,
    check_request,
    nanos_to_usd,
    never_fits_admission,
    refill_wait,
    usd_to_nanos,
)

# Float refill arithmetic must not refuse a caller who waited exactly the retry_after we gave.
EPSILON = 1e-9
# How many of the least recently used keys one call inspects for idleness: bounded work per call.
_PURGE_PER_CALL = 4


@dataclass(slots=True)
class _Bucket:
    tokens: float
    ts: float


@dataclass(slots=True)
class _KeyState:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    budget_period: str = ""
    budget_spent: int = 0  # nano-USD, reservations included
    budget_ends_at: float = math.inf  # wall-clock end of budget_period
    full_at: float = 0.0  # monotonic time when both buckets are full again


@dataclass(frozen=True, slots=True)
class _Limits:
    """A spec with `scale` applied; rates are tokens per second."""

    request_capacity: float | None
    request_rate: float
    token_capacity: float | None
    token_rate: float
    budget_nanos: int | None


_LIMITS_CACHE_SIZE = 10_000


class MemoryLimiter:
    """Per-key state in a bounded LRU; atomic because admit and settle never await.

    `scale` multiplies every limit: as the fail-open fallback it is 1 / expected_instances, so
    that the instances together stay near the key's real limits while Redis is unreachable.
    Budgets live only as long as the process and are forgotten when a key is evicted by `max_keys`.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_keys: int = 100_000,
        scale: float = 1.0,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        if not 0 < scale <= 1:
            raise ValueError("scale must be in (0, 1]")
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_keys = max_keys
        self.scale = scale
        self._limits_cache: dict[LimitSpec, _Limits] = {}
        # The current day and month periods, kept until the wall clock passes their end.
        self._periods: dict[BudgetPeriod | None, tuple[str, float]] = {}
        self._keys: OrderedDict[int, _KeyState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        check_request(tokens, cost_usd)
        if spec.never_fits(tokens):
            return never_fits_admission()
        now = self._clock()
        state = self._state(key_id, now)
        limits = self._limits(spec)
        cost = usd_to_nanos(cost_usd, round_up=True)
        reason: Reason | None = None
        retry_after: float | None = None

        requests = tokens_level = 0.0
        if limits.request_capacity is not None:
            requests = _level(state.requests, limits.request_capacity, limits.request_rate, now)
            if requests + EPSILON < 1:
                reason, retry_after = "rpm", refill_wait(requests, 1, limits.request_rate)
        if limits.token_capacity is not None:
            tokens_level = _level(state.tokens, limits.token_capacity, limits.token_rate, now)
            # Under scale a request may exceed this instance's share: it waits for a full bucket,
            # then drives it negative, so the share is still respected on average.
            needed = min(tokens, limits.token_capacity)
            if reason is None and tokens_level + EPSILON < needed:
                reason, retry_after = "tpm", refill_wait(tokens_level, needed, limits.token_rate)
        spent = 0
        if limits.budget_nanos is not None:
            spent = self._spent(state, spec.budget_period)
            if spent + cost > limits.budget_nanos:
                # A spent budget outranks a busy bucket: waiting will not help, so say so.
                reason, retry_after = "budget", None

        if reason is None:
            requests -= 1
            tokens_level -= tokens
            spent += cost
        # Storing the refilled level at `now` changes nothing on a refusal, and keeps one code path.
        if limits.request_capacity is not None:
            state.requests = _Bucket(requests, now)
        if limits.token_capacity is not None:
            state.tokens = _Bucket(tokens_level, now)
        if limits.budget_nanos is not None:
            state.budget_spent = spent
        state.full_at = _full_at(state, limits, now)

        return Admission(
            allowed=reason is None,
            reason=reason,
            retry_after_s=retry_after,
            requests=None
            if limits.request_capacity is None
            else bucket_state(limits.request_capacity, limits.request_rate, requests),
            tokens=None
            if limits.token_capacity is None
            else bucket_state(limits.token_capacity, limits.token_rate, tokens_level),
            budget_remaining_usd=None
            if limits.budget_nanos is None
            else nanos_to_usd(max(0, limits.budget_nanos - spent)),
        )

    async def settle(
        self,
        key_id: int,
        spec: LimitSpec,
        *,
        reserved_tokens: int,
        actual_tokens: int,
        reserved_cost_usd: Decimal,
        actual_cost_usd: Decimal,
        via_fallback: bool = False,  # only the ResilientLimiter has a fallback to route to
    ) -> None:
        check_request(reserved_tokens, reserved_cost_usd)
        check_request(actual_tokens, actual_cost_usd)
        now = self._clock()
        state = self._state(key_id, now)
        limits = self._limits(spec)
        if limits.token_capacity is not None and reserved_tokens != actual_tokens:
            level = _level(state.tokens, limits.token_capacity, limits.token_rate, now)
            # An overshoot makes the level negative: the next requests wait until it is paid back.
            level = min(limits.token_capacity, level + reserved_tokens - actual_tokens)
            state.tokens = _Bucket(level, now)
            state.full_at = _full_at(state, limits, now)
        if limits.budget_nanos is not None:
            delta = usd_to_nanos(actual_cost_usd, round_up=True) - usd_to_nanos(reserved_cost_usd, round_up=True)
            # Never below zero: a refund settled after a period boundary must not credit the new period.
            state.budget_spent = max(0, self._spent(state, spec.budget_period) + delta)

    async def aclose(self) -> None:
        self._keys.clear()

    def _state(self, key_id: int, now: float) -> _KeyState:
        self._purge_idle(now)
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key_id)
        return state

    def _purge_idle(self, now: float) -> None:
        """Drop, among the least recently used keys, those whose buckets are full and whose budget holds nothing."""
        wall = self._wall_clock()
        oldest = list(itertools.islice(self._keys.items(), _PURGE_PER_CALL))
        for key_id, state in oldest:
            if now >= state.full_at and not (state.budget_spent and wall < state.budget_ends_at):
                del self._keys[key_id]

    def _spent(self, state: _KeyState, period: BudgetPeriod | None) -> int:
        period_id, ends_at = self._current_period(period)
        if state.budget_period != period_id:
            state.budget_period, state.budget_spent, state.budget_ends_at = period_id, 0, ends_at
        return state.budget_spent

    def _current_period(self, period: BudgetPeriod | None) -> tuple[str, float]:
        wall = self._wall_clock()
        known = self._periods.get(period)
        if known is None or wall >= known[1] or period is None:
            known = self._periods[period] = _period(period, wall)
        return known

    def _limits(self, spec: LimitSpec) -> _Limits:
        # Specs are frozen and few (one per key's limits): compute each once.
        limits = self._limits_cache.get(spec)
        if limits is None:
            if len(self._limits_cache) >= _LIMITS_CACHE_SIZE:
                self._limits_cache.clear()
            limits = self._limits_cache[spec] = self._compute_limits(spec)
        return limits

    def _compute_limits(self, spec: LimitSpec) -> _Limits:
        scale = self.scale
        request_capacity = spec.request_capacity
        budget_nanos = None if spec.budget_usd is None else usd_to_nanos(spec.budget_usd, round_up=False)
        if budget_nanos is not None and scale != 1:
            budget_nanos = math.floor(budget_nanos * Fraction(scale))
        return _Limits(
            # A share smaller than one request would lock the key out entirely.
            request_capacity=None if request_capacity is None else max(1.0, request_capacity * scale),
            request_rate=(spec.rpm or 0) * scale / 60,
            token_capacity=None if spec.tpm is None else spec.tpm * scale,
            token_rate=(spec.tpm or 0) * scale / 60,
            budget_nanos=budget_nanos,
        )


def _level(bucket: _Bucket | None, capacity: float, rate: float, now: float) -> float:
    if bucket is None:
        return capacity
    return min(capacity, bucket.tokens + max(0.0, now - bucket.ts) * rate)


def _full_at(state: _KeyState, limits: _Limits, now: float) -> float:
    full_at = now
    if state.requests is not None and limits.request_capacity is not None:
        full_at = max(full_at, now + (limits.request_capacity - state.requests.tokens) / limits.request_rate)
    if state.tokens is not None and limits.token_capacity is not None:
        full_at = max(full_at, now + (limits.token_capacity - state.tokens.tokens) / limits.token_rate)
    return full_at


def _period(period: BudgetPeriod | None, wall: float) -> tuple[str, float]:
    """The UTC period id ("2025-06-01", "2025-06" or "life") and its end as a wall-clock time."""
    if period is None:
        return "life", math.inf
    now = datetime.fromtimestamp(wall, UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + timedelta(days=1)).timestamp()
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (
        start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    )
    return start.strftime("%Y-%m"), following.timestamp()
