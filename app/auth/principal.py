"""Who is calling: what an authenticated API key grants."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: int
    name: str
    prefix: str
