"""A limiter that makes a child span of every call to the shared limiter (Redis), when tracing is on."""

from __future__ import annotations

from decimal import Decimal

from opentelemetry.trace import Span

from app.enforcement.limits import Admission, Limiter, LimitSpec, PeriodSpend, Reservation
from app.observability import tracing


class TracedLimiter:
    """Wraps the shared limiter only: a call to it is a round trip worth seeing in a trace. The
    in-process limiter's calls take microseconds, less than a span costs, and are not wrapped."""

    def __init__(self, inner: Limiter, backend: str) -> None:
        self._inner = inner
        self._attributes = {"pacemaker.limiter.backend": backend}

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        return await tracing.traced(
            "limiter admit",
            self._inner.admit(key_id, spec, tokens=tokens, cost_usd=cost_usd),
            {**self._attributes, "pacemaker.limiter.tokens": tokens},
            after=_admission,
        )

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        await tracing.traced(
            "limiter settle",
            self._inner.settle(key_id, spec, reservation, actual_tokens=actual_tokens, actual_cost_usd=actual_cost_usd),
            {**self._attributes, "pacemaker.limiter.tokens": actual_tokens},
        )

    async def seed(self, key_id: int, spec: LimitSpec, spend: PeriodSpend) -> None:
        await tracing.traced("limiter seed", self._inner.seed(key_id, spec, spend), dict(self._attributes))

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def degraded(self) -> bool:
        """The wrapped limiter's (the activity feed shows it): True while its backend is down."""
        return bool(getattr(self._inner, "degraded", False))


def _admission(span: Span, admission: Admission) -> None:
    # A refusal is the limiter doing its job, not a failed call: an attribute, not an error.
    span.set_attribute("pacemaker.limiter.admitted", admission.reservation is not None)
    if admission.reason:
        span.set_attribute("pacemaker.limiter.reason", admission.reason)
