"""The calculator tool: arithmetic by AST whitelist, with refusals that read well."""

from __future__ import annotations

import pytest

from app.tools.base import ToolContext, ToolError
from app.tools.calculator import CalculatorTool, evaluate


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("17 * 23 + 4", 395),
        ("(1 + 2) * 3", 9),
        ("2 ^ 10", 1024),
        ("2 ** 0.5 * 2 ** 0.5", 2),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("sqrt(16) + abs(-2)", 6),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("round(pi, 2)", 3.14),
    ],
)
def test_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == pytest.approx(value)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('id')", "unsupported"),
        ("open('/etc/passwd').read()", "unsupported"),
        ("(1).__class__", "unsupported"),
        ("x + 1", "unsupported"),
        ("'a' * 3", "unsupported"),
        ("1 / 0", "division by zero"),
        ("9 ** 9 ** 9", "exponent too large"),
        ("10 ** 300 * 10 ** 300", "out of range"),
        ("sqrt(-1)", "cannot compute"),
        ("min()", "cannot compute"),
        ("1 +", "not an arithmetic expression"),
        ("lambda: 1", "unsupported"),
    ],
)
def test_refuses_what_is_not_plain_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        evaluate(expression)


async def test_the_tool_validates_its_arguments_against_its_schema() -> None:
    tool = CalculatorTool()
    assert tool.parameters["required"] == ["expression"]
    assert tool.openai_definition()["function"]["name"] == "calculator"
    assert (await tool.run(tool.parse_arguments('{"expression": "6 * 7"}'), ToolContext()))["result"] == 42
    for bad in ('{"expr": "1"}', '{"expression": 5}', "not json", '{"expression": ""}'):
        with pytest.raises(ToolError, match="invalid arguments for calculator"):
            tool.parse_arguments(bad)
