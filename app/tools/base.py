"""What a tool is: a name, a description, a JSON Schema for its arguments, and an async call."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError


class ToolError(Exception):
    """A tool failed in a way the model should hear about (bad arguments, a refused input).

    `result` carries what the tool produced before failing (a sandboxed program's output), which
    the caller gets along with the error.
    """

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class ToolUnavailable(ToolError):
    """The tool's backend failed (unreachable, 5xx): this counts against the tool's circuit breaker."""


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who is calling, for tools that keep state or limits per caller (the sandbox's workspaces)."""

    key_id: int | None = None
    session_id: str | None = None
    # The key's ceilings for the sandbox (timeout_s, memory_mb, fuel); None: the deployment's.
    sandbox_max: dict[str, float] | None = None


class Tool(ABC):
    name: str
    description: str
    timeout_s: float = 30.0  # a direct call's bound; in the agent loop the task's deadline also applies

    @property
    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """The JSON Schema of the arguments."""

    def openai_definition(self) -> dict[str, Any]:
        """The tool as OpenAI's function definition; made once (a pydantic JSON Schema costs ~1 ms,
        and every model call of every task offers its tools). Treat it as read-only."""
        definition: dict[str, Any] | None = getattr(self, "_definition", None)
        if definition is None:
            definition = {
                "type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
            }
            self._definition = definition
        return definition

    @abstractmethod
    def parse_arguments(self, raw: str | dict[str, Any]) -> Any:
        """Validated arguments; raises ToolError naming what is wrong."""

    @abstractmethod
    async def run(self, arguments: Any, context: ToolContext) -> Any:
        """Do the work; the return value must be JSON-serialisable. Raise ToolError on failure."""


ArgsT = TypeVar("ArgsT", bound=BaseModel)


@functools.cache
def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    # A model's schema never changes; building it is the costly part of offering a tool.
    return model.model_json_schema()


class ModelTool(Tool, Generic[ArgsT]):
    """A tool whose arguments are a pydantic model: one source for validation and JSON Schema."""

    arguments_model: type[ArgsT]

    @property
    def parameters(self) -> dict[str, Any]:
        return _schema_of(self.arguments_model)

    def parse_arguments(self, raw: str | dict[str, Any]) -> ArgsT:
        try:
            if isinstance(raw, str):
                return self.arguments_model.model_validate_json(raw or "{}")
            return self.arguments_model.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in exc.errors()
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from None
