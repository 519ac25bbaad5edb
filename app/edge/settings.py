"""`server.edge`: the per-address limits checked before authentication (app/edge/)."""

from __future__ import annotations

from typing import Literal

from limits import RateLimitItem, parse_many
from pydantic import BaseModel, ConfigDict, Field, field_validator


class EdgeSettings(BaseModel):
    """Per client address, as uvicorn resolved it (X-Forwarded-For only from `forwarded_allow_ips`)."""

    # A misspelt setting is an error, not silently ignored (as in every app.config section).
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # `limits` notation: "6000/minute", "100 per second", "500/10 seconds". Fixed windows.
    rate: str = Field(
        "6000/minute",
        description="Requests per address (all but health, metrics, docs and the dashboard's files); past it,"
        " only requests whose key this instance already knows are served.",
    )
    failed_auth: str = Field(
        "20/minute",
        description="Failed authentications per address (401s: no key, unknown or revoked key); past it, only"
        " requests whose key this instance already knows are served.",
    )
    # auto: in the Redis of limits.redis_url when it is set (every instance counts together), else in
    # process; memory: in process whatever is set (no Redis call per request, each instance counts alone).
    storage: Literal["auto", "memory"] = "auto"
    redis_prefix: str = Field("pacemaker:edge", min_length=1)
    max_addresses: int = Field(
        100_000, ge=100, description="Addresses counted in process at once; the oldest windows go first beyond it."
    )
    # One IPv6 host is usually given a whole /64 (SLAAC, cloud instances): counted address by address,
    # it could take a new address, and a fresh allowance of failed keys, for every request.
    ipv6_prefix: int = Field(
        64,
        ge=32,
        le=128,
        description="IPv6 clients are counted by their network of this prefix length (128: each address alone);"
        " an IPv4-mapped IPv6 address counts as its IPv4 address.",
    )

    @field_validator("rate", "failed_auth")
    @classmethod
    def _a_limit(cls, value: str) -> str:
        item = rate_item(value)
        if item.amount < 1:
            raise ValueError(f"{value!r}: the amount must be at least 1")
        return value


def rate_item(text: str) -> RateLimitItem:
    """One `limits` rate ("20/minute"); a ValueError for anything else (several, or unreadable)."""
    try:
        items = parse_many(text)
    except ValueError:
        items = []
    if len(items) != 1:
        raise ValueError(f"{text!r} is not one rate such as '20/minute' or '100 per second'")
    return items[0]
