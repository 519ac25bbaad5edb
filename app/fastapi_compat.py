"""FastAPI without pydantic.v1: imported (for its effect) before any route is defined.

FastAPI 0.165 asks of every response model, and of objects it encodes, whether they are pydantic.v1
models, and imports pydantic.v1 (1.8 MB of modules, per worker) to ask. A v1 model cannot exist
unless pydantic.v1 has been imported, so until then the answer is no without importing it; once it
is imported (by anything), FastAPI's own checks run unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from fastapi import encoders
from fastapi._compat import shared


def _unless_v1_absent(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def checked(value: Any) -> bool:
        return "pydantic.v1" in sys.modules and check(value)

    checked.__wrapped__ = check  # type: ignore[attr-defined]
    return checked


def install() -> None:
    """Idempotent; FastAPI's functions are looked up in these two modules at call time."""
    for module, name in ((shared, "is_pydantic_v1_model_class"), (shared, "is_pydantic_v1_model_instance")):
        current = getattr(module, name)
        if not hasattr(current, "__wrapped__"):
            setattr(module, name, _unless_v1_absent(current))
    # encoders imported the instance check by name.
    setattr(encoders, "is_pydantic_v1_model_instance", shared.is_pydantic_v1_model_instance)  # noqa: B010


install()
