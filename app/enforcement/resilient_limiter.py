"""A Limiter that survives its shared backend: on a Redis failure it fails open to a local share or fails closed."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Literal

from redis.exceptions import RedisError

from app.enforcement.limits import Admission, Limiter, LimitSpec, PeriodSpend, Reservation
from app.enforcement.memory_limiter import MemoryLimiter
from app.enforcement.outage import Outage
from app.errors import LimiterUnavailable

log = logging.getLogger(__name__)

Policy = Literal["fail_open", "fail_closed"]

# What "the backend is down" looks like; anything else is a bug and propagates.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (RedisError, ConnectionError, TimeoutError, OSError)


class ResilientLimiter:
    """Asks `primary`; while it fails, answers from `fallback` (fail_open) or refuses with 503 (fail_closed).

    After a failure the primary is skipped for `cooldown_s`, so an outage costs one timeout, not
    one per request; then a single call probes it again, so it recovers without a restart.
    A backend failure is never reported as a rate-limit refusal. The fallback's budgets are
    seeded afresh in each outage: its state is dropped once the primary answers again.
    """

    def __init__(
        self,
        primary: Limiter,
        fallback: MemoryLimiter,
        *,
        policy: Policy,
        expected_instances: int,
        on_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_after_s: float = 1.0,
        cooldown_s: float = 1.0,
    ) -> None:
        if expected_instances < 1:
            raise ValueError("expected_instances must be at least 1")
        # Each instance may only spend its share locally, or N instances would allow N times the limit.
        if policy == "fail_open" and not math.isclose(fallback.scale, 1 / expected_instances):
            raise ValueError(
                f"the fallback's scale must be 1/expected_instances ({1 / expected_instances:.4g}), "
                f"got {fallback.scale:.4g}"
            )
        self._primary = primary
        self._fallback = fallback
        self._policy = policy
        self._on_error = on_error
        self._retry_after_s = retry_after_s
        self._outage = Outage(clock, cooldown_s)

    @property
    def degraded(self) -> bool:
        """True while the primary is considered down (for a health check)."""
        return self._outage.down

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        if self._outage.may_try():
            probe = self._outage.start_probe()
            try:
                admission = await self._primary.admit(key_id, spec, tokens=tokens, cost_usd=cost_usd)
            except BACKEND_ERRORS as exc:
                self._failed(exc)
            else:
                self._answered()
                return admission
            finally:
                self._outage.end_probe(probe)
        if self._policy == "fail_closed":
            raise LimiterUnavailable(
                "The rate limiter's backend is unreachable; try again shortly.", retry_after=self._retry_after_s
            )
        admission = await self._fallback.admit(key_id, spec, tokens=tokens, cost_usd=cost_usd)
        if admission.reservation is None:
            return admission
        return replace(admission, reservation=replace(admission.reservation, via_fallback=True))

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        # A reservation is settled where it was taken: a refund to Redis of a charge the local
        # bucket made would credit other requests' spend (and the other way round).
        if reservation.via_fallback:
            await self._fallback.settle(
                key_id, spec, reservation, actual_tokens=actual_tokens, actual_cost_usd=actual_cost_usd
            )
            return
        if self._outage.may_try():
            probe = self._outage.start_probe()
            try:
                await self._primary.settle(
                    key_id, spec, reservation, actual_tokens=actual_tokens, actual_cost_usd=actual_cost_usd
                )
            except BACKEND_ERRORS as exc:
                self._failed(exc)
            else:
                self._answered()
                return
            finally:
                self._outage.end_probe(probe)
        # Redis took the reservation and is away now: the reservation stands there (the strict
        # side: the key is charged the estimate), and the buckets refill on their own.
        log.debug("limiter backend down: settle for key %s dropped", key_id)

    async def seed(self, key_id: int, spec: LimitSpec, spend: PeriodSpend) -> None:
        """Seed the backend the next admit will ask: the primary, or the fallback while it is down."""
        if self._outage.may_try():
            probe = self._outage.start_probe()
            try:
                await self._primary.seed(key_id, spec, spend)
            except BACKEND_ERRORS as exc:
                self._failed(exc)
            else:
                self._answered()
                return
            finally:
                self._outage.end_probe(probe)
        if self._policy == "fail_closed":
            raise LimiterUnavailable(
                "The rate limiter's backend is unreachable; try again shortly.", retry_after=self._retry_after_s
            )
        await self._fallback.seed(key_id, spec, spend)

    async def aclose(self) -> None:
        await self._primary.aclose()
        await self._fallback.aclose()

    def _failed(self, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error()
        if self._outage.failed():
            action = "answering from the local share" if self._policy == "fail_open" else "refusing with 503"
            log.warning("rate limiter backend unavailable (%s: %s); %s", type(exc).__name__, exc, action)

    def _answered(self) -> None:
        if self._outage.answered():
            # What the fallback spent meanwhile is in the audit log; a later outage seeds from there,
            # not from this outage's state, which knows nothing of the spend on the primary since.
            self._fallback.forget()
            log.info("rate limiter backend is answering again")
