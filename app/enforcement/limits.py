"""The per-key limiter's shared vocabulary: limit specs, admissions, money units and the Limiter protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol

# "seed": the limiter holds no budget state for the key's current period and must be seeded first.
Reason = Literal["rpm", "tpm", "budget", "seed"]
BudgetPeriod = Literal["day", "month"]

NANOS_PER_USD = 1_000_000_000


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One key's limits; None means unlimited in that dimension.

    `burst` is the request bucket's capacity (None: `rpm`); it has no effect without `rpm`.
    `budget_period` None makes `budget_usd` a lifetime budget; "day" and "month" are UTC periods.
    """

    rpm: int | None = None
    burst: int | None = None
    tpm: int | None = None
    budget_usd: Decimal | None = None
    budget_period: BudgetPeriod | None = None

    def __post_init__(self) -> None:
        # A zero rate would never refill: that is a disabled key, which is auth's job, not ours.
        for name in ("rpm", "burst", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for unlimited), got {value}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must not be negative, got {self.budget_usd}")

    @property
    def request_capacity(self) -> int | None:
        if self.rpm is None:
            return None
        return self.burst if self.burst is not None else self.rpm

    def never_fits(self, tokens: int) -> bool:
        """A request for more tokens than the TPM bucket holds can never be admitted, however long it waits."""
        return self.tpm is not None and tokens > self.tpm


@dataclass(frozen=True, slots=True)
class BucketState:
    """What the `x-ratelimit-*` headers report for one bucket."""

    limit: int
    remaining: int
    reset_s: float  # seconds until the bucket is full again


@dataclass(frozen=True, slots=True)
class Period:
    """A budget period as the limiter's clock sees it: its id ("2025-06-01", "2025-06", "life") and start."""

    id: str
    start: datetime | None  # None: a lifetime budget, which counts everything ever spent


@dataclass(frozen=True, slots=True)
class PeriodSpend:
    """What a key spent in one budget period, by the durable record: the value a limiter is seeded with."""

    period: Period
    usd: Decimal


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admission took; settling it needs it back, to settle where and into what it was taken."""

    tokens: int
    cost_usd: Decimal
    # Taken by a fallback (the local bucket while Redis is down): its settlement goes there too.
    via_fallback: bool = False
    # The budget state it was charged to ("" without a budget); a state seeded since then is another.
    budget_epoch: str = ""


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of one admit: allowed, or the failing dimension (budget first, then rpm, then tpm).

    `retry_after_s` is the refill time of the failing bucket; it is None for a budget refusal
    (waiting does not help within the period) and for a request larger than the whole TPM
    capacity (reason "tpm": waiting never helps, the caller should answer 4xx, not 429).
    Reason "seed" took nothing: the caller seeds `period` (see Limiter.seed) and admits again.
    """

    allowed: bool
    reason: Reason | None
    retry_after_s: float | None
    requests: BucketState | None
    tokens: BucketState | None
    budget_remaining_usd: Decimal | None
    reservation: Reservation | None = None  # set when allowed
    period: Period | None = None  # set with reason "seed"


class Limiter(Protocol):
    """Checks and takes a key's requests, tokens and budget in one atomic step.

    A limiter only stores: a budget's spend comes from outside (the audit log) through `seed`,
    whenever the limiter holds no budget state for the key's current period.
    """

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        """Refill, then take one request, `tokens` tokens and `cost_usd` of budget, or take nothing."""
        ...

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        """Replace an admitted reservation with what was actually used (the token bucket may go negative)."""
        ...

    async def seed(self, key_id: int, spec: LimitSpec, spend: PeriodSpend) -> None:
        """Start the key's budget state at `spend`, only if it still has none for that period (never counted twice)."""
        ...

    async def aclose(self) -> None: ...


def usd_to_nanos(usd: Decimal, *, round_up: bool) -> int:
    """Exact conversion to nano-USD: charges round up, budgets round down, so rounding never favours spending."""
    if not usd.is_finite():
        raise ValueError(f"not a finite amount: {usd}")
    numerator, denominator = usd.as_integer_ratio()
    scaled = numerator * NANOS_PER_USD
    # Integer arithmetic, so no Decimal context precision can round anything away.
    return -(-scaled // denominator) if round_up else scaled // denominator


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


def bucket_state(capacity: float, rate_per_s: float, tokens: float) -> BucketState:
    return BucketState(
        limit=int(capacity),
        remaining=max(0, math.floor(tokens)),
        reset_s=max(0.0, (capacity - tokens) / rate_per_s),
    )


def refill_wait(tokens: float, needed: float, rate_per_s: float) -> float:
    """Seconds until a bucket holding `tokens` (possibly negative) holds `needed`."""
    return max(0.0, (needed - tokens) / rate_per_s)


def check_request(tokens: int, cost_usd: Decimal) -> None:
    if tokens < 0:
        raise ValueError(f"tokens must not be negative, got {tokens}")
    if cost_usd < 0:
        raise ValueError(f"cost_usd must not be negative, got {cost_usd}")


def never_fits_admission() -> Admission:
    return Admission(
        allowed=False, reason="tpm", retry_after_s=None, requests=None, tokens=None, budget_remaining_usd=None
    )


def needs_seed(period: Period) -> Admission:
    return Admission(
        allowed=False,
        reason="seed",
        retry_after_s=None,
        requests=None,
        tokens=None,
        budget_remaining_usd=None,
        period=period,
    )
