"""Which model a task runs on: explicit model > model_tier > context.model_tier > the mode's tier."""

from __future__ import annotations

from typing import Any, get_args

from app.config import Mode, Tier, TierSettings
from app.errors import InvalidRequest

MODE_TIERS: dict[Mode, Tier] = {"simple": "small", "complex": "medium", "research": "large"}


def choose_model(
    tiers: TierSettings,
    *,
    mode: Mode,
    model: str | None,
    model_tier: Tier | None,
    context: dict[str, Any] | None,
) -> tuple[str, Tier | None]:
    """The model name and the tier it came from (None when the caller named a model)."""
    if model:
        return model, None
    tier = model_tier or _context_tier(context) or MODE_TIERS[mode]
    return tiers.model_for(tier), tier


def _context_tier(context: dict[str, Any] | None) -> Tier | None:
    if not context or context.get("model_tier") is None:
        return None
    value = context["model_tier"]
    if value not in get_args(Tier):
        raise InvalidRequest(f"context.model_tier must be one of small, medium, large; got {value!r}")
    tier: Tier = value
    return tier
