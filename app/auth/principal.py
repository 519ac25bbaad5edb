"""Who is calling: what an authenticated API key grants."""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The key's own limits; None means the deployment default (Settings.limits)."""

    rpm: int | None = None
    burst: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    max_tokens_per_request: int | None = None
    budget_usd: Decimal | None = None
    budget_period: str | None = None
    max_background_tasks: int | None = None  # queued or running at once

    @classmethod
    def of(cls, source: object) -> KeyLimits:
        """The limits held by anything with these attribute names (a key's row, CLI arguments)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: int
    name: str
    prefix: str
    limits: KeyLimits = KeyLimits()
    is_admin: bool = False  # may read every key's audit rows
    allowed_tools: frozenset[str] | None = None  # None: every tool the deployment offers
    sandbox_max: dict[str, float] | None = None  # the key's ceilings on sandbox limits
