"""The registry of tools a deployment offers, and which of them a caller may use."""

from __future__ import annotations

from collections.abc import Iterable

from app.auth.principal import Principal
from app.tools.base import Tool
from app.tools.calculator import CalculatorTool


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool]) -> None:
        self._tools = {tool.name: tool for tool in tools}

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def allowed_for(self, principal: Principal) -> list[str]:
        """The names of the tools this key may use."""
        if principal.allowed_tools is None:
            return self.names()
        return [name for name in self.names() if name in principal.allowed_tools]

    def select(self, allowed: Iterable[str] | None) -> list[Tool]:
        """The tools in `allowed` (all of them when None), in registry order."""
        if allowed is None:
            return list(self._tools.values())
        wanted = set(allowed)
        return [tool for name, tool in self._tools.items() if name in wanted]


def builtin_tools() -> list[Tool]:
    return [CalculatorTool()]
