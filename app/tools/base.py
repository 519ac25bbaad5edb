"""What a tool is: a name, a description, a JSON Schema for its arguments, and an async call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

import orjson
from pydantic import BaseModel, ValidationError


class ToolError(Exception):
    """A tool failed in a way the model should hear about (bad arguments, a refused input)."""


ArgsT = TypeVar("ArgsT", bound=BaseModel)


class Tool(ABC, Generic[ArgsT]):
    """A tool whose arguments are a pydantic model: one source for validation and JSON Schema."""

    name: ClassVar[str]
    description: ClassVar[str]
    arguments_model: type[ArgsT]

    @property
    def parameters(self) -> dict[str, Any]:
        return self.arguments_model.model_json_schema()

    def openai_definition(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

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

    @abstractmethod
    async def run(self, arguments: ArgsT) -> Any:
        """Do the work; the return value must be JSON-serialisable. Raise ToolError on failure."""


def dumps_result(value: Any) -> str:
    return orjson.dumps(value).decode()
