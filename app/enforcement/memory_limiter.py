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
    Period,
    PeriodSpend,
    Reason,
    Reservation,
    bucket_state,
    check_request,
    nanos_to_usd,
    needs_seed,
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
    budget_period: str = ""  # the period the budget state is for; "" until it is seeded
    budget_spent: int = 0  # nano-USD, reservations included
    budget_ends_at: float = math.inf  # wall-clock end of budget_period
    budget_epoch: str = ""  # names this seeding of the state, for the reservations charged to it
    full_at: float = 0.0  # monotonic time when both buckets are full again


@dataclass(frozen=True, slots=True)
class _Window:
    """A budget period on the wall clock."""

    id: str
    start: float | None  # None: lifetime
    end: float


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
    that the instances together stay near the key's real limits while Redis is unreachable; a
    seeded spend is scaled alike, so the share of what is left is (budget - spent) * scale.
    A budget's state lives as long as the process or until `max_keys` evicts it; then the next
    admit answers "seed" and the caller seeds it again from the durable record.
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
        self._periods: dict[BudgetPeriod | None, _Window] = {}
        self._keys: OrderedDict[int, _KeyState] = OrderedDict()
        self._seeds = itertools.count(1)

    def __len__(self) -> int:
        return len(self._keys)

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        check_request(tokens, cost_usd)
        if spec.never_fits(tokens):
            return never_fits_admission()
        now = self._clock()
        state = self._state(key_id, now)
        limits = self._limits(spec)
        if limits.budget_nanos is not None:
            window = self._current_period(spec.budget_period)
            if state.budget_period != window.id:
                return needs_seed(_as_period(window))  # before anything is taken
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
        spent = state.budget_spent
        if limits.budget_nanos is not None and spent + cost > limits.budget_nanos:
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
        # Never earlier than it was: a spec without a bucket (a task's later model calls carry no
        # rpm) says nothing of that bucket, and must not let an empty one pass for full (and the
        # key's state be dropped as idle, its requests bucket with it).
        state.full_at = max(state.full_at, _full_at(state, limits, now))

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
            reservation=None if reason is not None else Reservation(tokens, cost_usd, budget_epoch=state.budget_epoch),
        )

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        reserved_tokens = reservation.tokens
        check_request(reserved_tokens, reservation.cost_usd)
        check_request(actual_tokens, actual_cost_usd)
        now = self._clock()
        state = self._state(key_id, now)
        limits = self._limits(spec)
        if limits.token_capacity is not None and reserved_tokens != actual_tokens:
            level = _level(state.tokens, limits.token_capacity, limits.token_rate, now)
            # An overshoot makes the level negative: the next requests wait until it is paid back.
            level = min(limits.token_capacity, level + reserved_tokens - actual_tokens)
            state.tokens = _Bucket(level, now)
            state.full_at = max(state.full_at, _full_at(state, limits, now))
        if limits.budget_nanos is None:
            return
        window = self._current_period(spec.budget_period)
        if state.budget_period != window.id:
            return  # no state to settle into: the next admit seeds it from the record, this call included
        actual = usd_to_nanos(actual_cost_usd, round_up=True)
        if reservation.budget_epoch == state.budget_epoch:
            state.budget_spent += actual - usd_to_nanos(reservation.cost_usd, round_up=True)
        elif reservation.budget_epoch.startswith(window.id + "/"):
            # Charged to a state since lost and seeded again this period: the seed cannot hold this
            # call (a request's audit row is written after its settlements), so it is charged in full.
            state.budget_spent += actual
        # Otherwise it was charged in an earlier period: that period's spend, not this one's.

    async def seed(self, key_id: int, spec: LimitSpec, spend: PeriodSpend) -> None:
        if spec.budget_usd is None:
            return
        window = self._current_period(spec.budget_period)
        state = self._state(key_id, self._clock())
        # Read for a period that has ended, or there is a state already (seeded by a concurrent
        # caller, or charged since): never count the spend twice.
        if spend.period.id != window.id or state.budget_period == window.id:
            return
        state.budget_period, state.budget_ends_at = window.id, window.end
        state.budget_spent = _scaled_spend(usd_to_nanos(spend.usd, round_up=True), self.scale)
        state.budget_epoch = f"{window.id}/{next(self._seeds)}"

    def forget(self) -> None:
        """Drop every key's state (the fallback does, once Redis answers again, so the next outage seeds afresh)."""
        self._keys.clear()

    async def aclose(self) -> None:
        self.forget()

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
        """Drop, among the least recently used keys, those whose buckets are full and that hold no current budget."""
        wall = self._wall_clock()
        oldest = list(itertools.islice(self._keys.items(), _PURGE_PER_CALL))
        for key_id, state in oldest:
            # A budget state is kept even at zero spend: dropping it would cost a seed from the record.
            if now >= state.full_at and not (state.budget_period and wall < state.budget_ends_at):
                del self._keys[key_id]

    def _current_period(self, period: BudgetPeriod | None) -> _Window:
        wall = self._wall_clock()
        known = self._periods.get(period)
        if known is None or wall >= known.end:
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


def _scaled_spend(nanos: int, scale: float) -> int:
    # Rounded up, as the budget is rounded down: rounding never favours spending.
    return nanos if scale == 1 else math.ceil(nanos * Fraction(scale))


def _as_period(window: _Window) -> Period:
    return Period(window.id, None if window.start is None else datetime.fromtimestamp(window.start, UTC))


def _period(period: BudgetPeriod | None, wall: float) -> _Window:
    """The UTC period ("2025-06-01", "2025-06" or "life") that `wall` falls in."""
    if period is None:
        return _Window("life", None, math.inf)
    now = datetime.fromtimestamp(wall, UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return _Window(start.strftime("%Y-%m-%d"), start.timestamp(), (start + timedelta(days=1)).timestamp())
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (
        start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    )
    return _Window(start.strftime("%Y-%m"), start.timestamp(), following.timestamp())
