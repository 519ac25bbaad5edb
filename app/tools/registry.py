"""The registry of tools a deployment offers, and which of them a caller may use."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.tools.base import Tool
from app.tools.calculator import CalculatorTool


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool[Any]]) -> None:
        self._tools = {tool.name: tool for tool in tools}

    def get(self, name: str) -> Tool[Any] | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def select(self, allowed: Iterable[str] | None) -> list[Tool[Any]]:
        """The tools in `allowed` (all of them when None), in registry order."""
        if allowed is None:
            return list(self._tools.values())
        wanted = set(allowed)
        return [tool for name, tool in self._tools.items() if name in wanted]


def builtin_tools() -> list[Tool[Any]]:
    return [CalculatorTool()]
