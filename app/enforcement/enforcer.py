"""The enforcement chain, one component for every way in.

At admission: token ceiling -> budget reservation and rate limits (one atomic limiter step) ->
concurrency. Around each model call (see ModelCall): a reservation for that call, the circuit
breaker, retries, and settlement to the real usage. Refusals carry the headers a client needs.
A limiter that holds no budget state for a key's period is seeded from the spend ledger first.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal

from starlette.types import Scope

from app.audit.context import AuditContext
from app.auth.principal import KeyLimits, Principal
from app.config import LimitSettings
from app.drain import new_work_refused
from app.enforcement.breaker import BreakerRegistry, CircuitBreaker
from app.enforcement.concurrency import ConcurrencyLimiter, Slot
from app.enforcement.ledger import RETRY_AFTER_S, BudgetSeeder, SpendLedger
from app.enforcement.limits import Admission, Limiter, LimitSpec, Period
from app.enforcement.limits import Reservation as Reservation  # re-exported: ModelCall holds one per call
from app.enforcement.retry import RetryPolicy
from app.errors import (
    AppError,
    BudgetExceeded,
    BudgetUnavailable,
    RateLimitExceeded,
    TokenLimitExceeded,
)
from app.middleware import add_response_headers
from app.observability.metrics import Metrics
from app.providers.base import Usage
from app.providers.registry import ModelRoute

Sleep = Callable[[float], Awaitable[None]]

log = logging.getLogger(__name__)

# A state seeded, then gone again before the admit that follows (evicted, a period just ended):
# seeding is tried this many times before the request is refused as retryable.
SEED_ATTEMPTS = 2
_SPECS_CACHED = 4096  # distinct key limits whose spec is kept


class Enforcer:
    def __init__(
        self,
        defaults: LimitSettings,
        limiter: Limiter,
        concurrency: ConcurrencyLimiter,
        breakers: BreakerRegistry,
        retry: RetryPolicy,
        metrics: Metrics,
        sleep: Sleep = asyncio.sleep,
        *,
        ledger: SpendLedger | None = None,
        settle_in_background: bool = False,
    ) -> None:
        """`settle_in_background`: settlements (a round trip to a shared limiter) run as tasks of their
        own, off the request's way (see _settle); `settled()` waits for them."""
        self.defaults = defaults
        self.limiter = limiter
        self.seeder = BudgetSeeder(limiter, ledger)
        self.concurrency = concurrency
        self.breakers = breakers
        self.retry = retry
        self.metrics = metrics
        self.sleep = sleep
        # Set by the lifespan: while the instance drains (app/drain.py), new work is refused.
        self.draining: Callable[[], bool] | None = None
        # Set by the lifespan: load shedding's refusal while the instance is overloaded (app/overload.py).
        self.overloaded: Callable[[], AppError | None] | None = None
        self._specs: dict[int, tuple[KeyLimits, LimitSpec]] = {}
        self._settle_in_background = settle_in_background
        self._settling: set[asyncio.Task[None]] = set()

    def spec_for(self, principal: Principal) -> LimitSpec:
        # Keys' limits are frozen and few: each one's spec is made once (a hot route asks twice per request).
        # By identity (a key's limits object lives as long as its cached principal): no dataclass hash.
        own = principal.limits
        known = self._specs.get(id(own))
        if known is not None and known[0] is own:
            return known[1]
        if len(self._specs) >= _SPECS_CACHED:
            self._specs.clear()
        spec = self._spec_of(own)
        self._specs[id(own)] = (own, spec)  # holding `own`, so that its id is not reused meanwhile
        return spec

    def _spec_of(self, own: KeyLimits) -> LimitSpec:
        default = self.defaults
        period = own.budget_period if own.budget_usd is not None else default.budget_period
        return LimitSpec(
            rpm=own.rpm if own.rpm is not None else default.rpm,
            burst=own.burst if own.burst is not None else default.burst,
            tpm=own.tpm if own.tpm is not None else default.tpm,
            budget_usd=own.budget_usd if own.budget_usd is not None else default.budget_usd,
            budget_period=period if period in ("day", "month") else None,  # type: ignore[arg-type]
        )

    async def admit(
        self,
        principal: Principal,
        *,
        route: ModelRoute | None,
        prompt_tokens: int,
        max_tokens: int,
        scope: Scope | None = None,
        audit: AuditContext | None = None,
    ) -> Ticket:
        """Admit one request (its first model call pre-paid), or raise the refusal.

        `route` None admits a request that calls no model (a direct tool call): it counts against
        the request rate and concurrency only.
        """
        if self.draining is not None and self.draining():
            raise self._rejected(new_work_refused())
        if self.overloaded is not None and (shed := self.overloaded()) is not None:
            raise self._rejected(shed)
        estimated = prompt_tokens + max_tokens
        ceiling = principal.limits.max_tokens_per_request or self.defaults.max_tokens_per_request
        spec = self.spec_for(principal)
        if ceiling is not None and estimated > ceiling:
            raise self._rejected(
                TokenLimitExceeded(f"The request may use {estimated} tokens; this key allows {ceiling} per request.")
            )
        if spec.never_fits(estimated):
            raise self._rejected(
                TokenLimitExceeded(
                    f"The request may use {estimated} tokens, more than this key's {spec.tpm} tokens per minute."
                )
            )
        cost = route.cost(Usage(prompt_tokens, max_tokens)) if route is not None else Decimal(0)
        admission = await self.limiter.admit(principal.key_id, spec, tokens=estimated, cost_usd=cost)
        if admission.period is not None:
            admission = await self._seeded(principal.key_id, spec, admission.period, estimated, cost)
        headers = rate_limit_headers(admission)
        if scope is not None:
            add_response_headers(scope, headers)
        self._observe_budget(principal, admission)
        reservation = admission.reservation
        if reservation is None:
            raise self._rejected(_refusal(admission, spec, headers))
        try:
            slot = self.concurrency.acquire(principal.key_id, self._max_concurrency(principal))
        except AppError as exc:
            await self._settle(principal, spec, reservation, Usage(), Decimal(0))
            raise self._rejected(exc) from None
        return Ticket(self, principal, spec, slot, reservation, audit)

    async def _seeded(self, key_id: int, spec: LimitSpec, period: Period, tokens: int, cost: Decimal) -> Admission:
        """Seed the budget state the limiter lacks for `period`, then admit again."""
        for _ in range(SEED_ATTEMPTS):
            try:
                await self.seeder.seed(key_id, spec, period)
            except AppError as exc:
                raise self._rejected(exc) from None
            admission = await self.limiter.admit(key_id, spec, tokens=tokens, cost_usd=cost)
            if admission.period is None:
                return admission
            period = admission.period
        raise self._rejected(
            BudgetUnavailable("The key's budget could not be loaded; try again shortly.", retry_after=RETRY_AFTER_S)
        )

    def breaker(self, route: ModelRoute) -> CircuitBreaker:
        return self.breakers.get(f"model:{route.provider.name}/{route.upstream_model}")

    def _max_concurrency(self, principal: Principal) -> int:
        return principal.limits.max_concurrency or self.defaults.max_concurrency

    def _rejected(self, error: AppError) -> AppError:
        self.metrics.rejections.labels(error.code).inc()
        return error

    def _observe_budget(self, principal: Principal, admission: Admission) -> None:
        if admission.budget_remaining_usd is not None:
            self.metrics.budget_remaining.labels(str(principal.key_id)).set(float(admission.budget_remaining_usd))

    async def _settle(
        self, principal: Principal, spec: LimitSpec, reservation: Reservation, usage: Usage, cost: Decimal
    ) -> None:
        settling = self.limiter.settle(
            principal.key_id, spec, reservation, actual_tokens=usage.total_tokens, actual_cost_usd=cost
        )
        if not self._settle_in_background:
            await settling
            return
        # On a shared limiter the settlement is a round trip the answer need not wait for: until it
        # lands the key holds its reservation a moment longer (the strict side, as while a request is
        # in flight), and a client leaving can no longer cancel it half-way. Its failures are the
        # limiter's to handle (ResilientLimiter drops a settle while its backend is down).
        task = asyncio.get_running_loop().create_task(settling)
        self._settling.add(task)
        task.add_done_callback(self._settled_one)

    def _settled_one(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("a settlement failed", exc_info=error)

    async def settled(self) -> None:
        """Wait for the settlements running in the background (before the limiter closes)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)


class Ticket:
    """An admitted request: it holds a concurrency slot and pays for each of its model calls."""

    def __init__(
        self,
        enforcer: Enforcer,
        principal: Principal,
        spec: LimitSpec,
        slot: Slot,
        first: Reservation,
        audit: AuditContext | None = None,
    ) -> None:
        self.enforcer = enforcer
        self.principal = principal
        self.audit = audit  # where each model call's spend is written down
        self._spec = spec
        self._slot = slot
        self._prepaid: Reservation | None = first

    @property
    def budgeted(self) -> bool:
        """The key has a budget: its model calls must stop at what was reserved for them."""
        return self._spec.budget_usd is not None

    async def reserve(self, route: ModelRoute, prompt_tokens: int, max_tokens: int) -> Reservation:
        """The reservation for one model call: the admission's for the first, a new one after."""
        if self._prepaid is not None:
            reservation, self._prepaid = self._prepaid, None
            return reservation
        enforcer = self.enforcer
        tokens = prompt_tokens + max_tokens
        cost = route.cost(Usage(prompt_tokens, max_tokens))
        # Later calls of the same task spend tokens and budget, but are not new requests.
        spec = replace(self._spec, rpm=None, burst=None)
        key_id = self.principal.key_id
        admission = await enforcer.limiter.admit(key_id, spec, tokens=tokens, cost_usd=cost)
        if admission.period is not None:
            admission = await enforcer._seeded(key_id, spec, admission.period, tokens, cost)
        enforcer._observe_budget(self.principal, admission)
        if admission.reservation is None:
            raise enforcer._rejected(_refusal(admission, spec, rate_limit_headers(admission)))
        return admission.reservation

    async def settle(self, reservation: Reservation, usage: Usage, cost: Decimal) -> None:
        await self.enforcer._settle(self.principal, self._spec, reservation, usage, cost)

    async def close(self) -> None:
        """Free the slot, and the pre-paid reservation if no model call used it."""
        self._slot.release()
        if self._prepaid is not None:
            prepaid, self._prepaid = self._prepaid, None
            await self.settle(prepaid, Usage(), Decimal(0))


def _refusal(admission: Admission, spec: LimitSpec, headers: dict[str, str]) -> AppError:
    if admission.reason == "budget":
        period = f" for this {spec.budget_period}" if spec.budget_period else ""
        return BudgetExceeded(f"The key's budget of {spec.budget_usd} USD{period} is spent.")
    if admission.retry_after_s is None:
        return TokenLimitExceeded("The request needs more tokens than the key's tokens per minute.")
    bucket = admission.requests if admission.reason == "rpm" else admission.tokens
    limits = {}
    if bucket is not None:
        # The short names some clients (and our DESIGN) expect on a 429, for the refusing bucket.
        limits = {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(bucket.remaining),
            "X-RateLimit-Reset": str(math.ceil(bucket.reset_s)),
        }
    what = "requests" if admission.reason == "rpm" else "tokens"
    return RateLimitExceeded(
        f"Too many {what} per minute for this key; retry in {admission.retry_after_s:.1f} s.",
        retry_after=admission.retry_after_s,
        headers={**headers, **limits},
    )


def rate_limit_headers(admission: Admission) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the request and token buckets that apply."""
    headers: dict[str, str] = {}
    for kind, bucket in (("requests", admission.requests), ("tokens", admission.tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(bucket.reset_s)
    return headers


def _duration(seconds: float) -> str:
    """1.5 -> '1.5s', 360 -> '6m0s', 0.02 -> '20ms': the format OpenAI uses."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3g}s" if rest % 1 else f"{int(rest)}s"
    return f"{int(minutes)}m{text}" if minutes else text
