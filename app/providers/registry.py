"""Builds the configured providers and resolves public model names to where they run and what they cost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal

from app.config import ModelSettings, PriceSettings, ProviderSettings, Settings
from app.errors import ModelNotFound
from app.providers.base import Provider, Usage
from app.providers.openai import OpenAICompatibleProvider
from app.providers.simulated import SimulatedProvider

ProviderFactory = Callable[[str, ProviderSettings], Provider]

PROVIDER_KINDS: dict[str, ProviderFactory] = {
    "openai": OpenAICompatibleProvider,
    "simulated": SimulatedProvider,
}

_PER_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str  # the public name clients use
    provider: Provider
    upstream_model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None = None
    fallback: ModelRoute | None = None  # where calls go while this model's breaker is open

    def cost(self, usage: Usage) -> Decimal:
        """Exact decimal cost; cached prompt tokens at the cached-input price when there is one."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        return (
            self.input_usd_per_mtok * (usage.prompt_tokens - cached)
            + (self.cached_input_usd_per_mtok or self.input_usd_per_mtok) * cached
            + self.output_usd_per_mtok * usage.completion_tokens
        ) / _PER_MILLION


class ProviderRegistry:
    def __init__(self, settings: Settings) -> None:
        self.providers: dict[str, Provider] = {
            name: PROVIDER_KINDS[cfg.kind](name, cfg) for name, cfg in settings.providers.items()
        }
        plain = {name: self._route(name, cfg, settings) for name, cfg in settings.models.items()}
        # One level of fallback: a fallback's own fallback is not followed.
        self._routes = {
            name: replace(route, fallback=plain[fb]) if (fb := settings.models[name].fallback) else route
            for name, route in plain.items()
        }

    def _route(self, name: str, cfg: ModelSettings, settings: Settings) -> ModelRoute:
        upstream_model = cfg.upstream_model or name
        # A price set on the model wins; then the price table, by the upstream's model name; else 0.
        listed = settings.prices.get(upstream_model) or PriceSettings(
            input_usd_per_mtok=Decimal(0), output_usd_per_mtok=Decimal(0)
        )
        return ModelRoute(
            name=name,
            provider=self.providers[cfg.provider],
            upstream_model=upstream_model,
            input_usd_per_mtok=_either(cfg.input_usd_per_mtok, listed.input_usd_per_mtok),
            output_usd_per_mtok=_either(cfg.output_usd_per_mtok, listed.output_usd_per_mtok),
            cached_input_usd_per_mtok=(
                cfg.cached_input_usd_per_mtok
                if cfg.cached_input_usd_per_mtok is not None
                else listed.cached_input_usd_per_mtok
            ),
        )

    def route(self, model: str) -> ModelRoute:
        found = self._routes.get(model)
        if found is None:
            known = ", ".join(sorted(self._routes))
            raise ModelNotFound(f"The model {model!r} does not exist. Known models: {known}.")
        return found

    def routes(self) -> list[ModelRoute]:
        return list(self._routes.values())

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


def _either(own: Decimal | None, listed: Decimal) -> Decimal:
    return own if own is not None else listed
