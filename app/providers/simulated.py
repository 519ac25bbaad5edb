"""The built-in `simulated` provider: deterministic answers streamed at a set pace, with tool calls.

It lets the whole agent loop run with no API key: a query holding an arithmetic expression makes it
call `calculator` (when offered), a tool result makes it answer with that result, and anything else
gets text derived from the query, so the same request always gets the same answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from app.config import ProviderSettings
from app.providers.base import LLMChunk, LLMRequest, Message, ToolCallDelta, Usage
from app.providers.tokens import count_message_tokens

_NUMBER = r"\(*\s*-?\d+(?:\.\d+)?\s*\)*"
ARITHMETIC = re.compile(rf"{_NUMBER}(?:\s*(?:\*\*|[-+*/%^])\s*{_NUMBER})+")
# A fenced Python block in the query: the simulated model runs it with the `python` tool.
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_PIECES = re.compile(r"\s*\S+")
_VOCABULARY = tuple(
    "the agent considers each step and weighs evidence before it answers while tools extend what it can do "
    "and limits keep every call within budget so that results stay fast reliable and easy to audit".split()
)


class SimulatedProvider:
    def __init__(self, name: str, settings: ProviderSettings) -> None:
        self.name = name
        self._delay = 1.0 / settings.tokens_per_second if settings.tokens_per_second > 0 else 0.0

    async def generate(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        prompt_tokens = count_message_tokens(request.messages)
        call = _tool_call_for(request)
        if call is not None:
            await self._pace(1)
            yield LLMChunk(tool_calls=[call])
            yield LLMChunk(finish_reason="tool_calls", usage=Usage(prompt_tokens, _call_tokens(call)))
            return

        pieces = _PIECES.findall(_answer_for(request.messages))
        finish = "stop"
        if request.max_tokens is not None and len(pieces) > request.max_tokens:
            pieces, finish = pieces[: request.max_tokens], "length"
        if request.stream:
            for piece in pieces:
                await self._pace(1)
                yield LLMChunk(text=piece)
        else:
            await self._pace(len(pieces))
            yield LLMChunk(text="".join(pieces))
        yield LLMChunk(finish_reason=finish, usage=Usage(prompt_tokens, len(pieces)))

    async def aclose(self) -> None:
        """Holds no resources."""

    async def _pace(self, tokens: int) -> None:
        if self._delay:
            await asyncio.sleep(self._delay * tokens)
        else:
            await asyncio.sleep(0)  # still yield to the loop, as a real upstream would


def _tool_call_for(request: LLMRequest) -> ToolCallDelta | None:
    if not request.messages or request.messages[-1].get("role") != "user":
        return None
    offered = {tool.get("function", {}).get("name") for tool in request.tools or ()}
    text = _text_of(request.messages[-1])
    code = PYTHON_BLOCK.search(text) if "python" in offered else None
    if code is not None:
        return _call("python", {"code": code.group(1)})
    match = ARITHMETIC.search(text) if "calculator" in offered else None
    if match is not None:
        return _call("calculator", {"expression": match.group(0).strip()})
    return None


def _call(tool: str, arguments: dict[str, str]) -> ToolCallDelta:
    encoded = orjson.dumps(arguments).decode()
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:12]
    return ToolCallDelta(index=0, id=f"call_{digest}", name=tool, arguments=encoded)


def _answer_for(messages: list[Message]) -> str:
    trailing_results = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        trailing_results.append(message)
    if trailing_results:
        return " ".join(_describe_result(_text_of(m)) for m in reversed(trailing_results))

    query = next((_text_of(m) for m in reversed(messages) if m.get("role") == "user"), "")
    seed = int.from_bytes(hashlib.sha256(query.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    words = [rng.choice(_VOCABULARY) for _ in range(rng.randint(24, 64))]
    topic = " ".join(query.split()[:12]) or "your request"
    return f"Simulated answer about {topic}: " + " ".join(words) + "."


def _describe_result(content: str) -> str:
    try:
        value: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        return f"The tool returned: {content}"
    if isinstance(value, dict) and "stdout" in value:
        printed = str(value["stdout"]).strip()
        if value.get("status") == "ok":
            return f"The program printed: {printed}"
        return f"The program ended with {value.get('status')}: {str(value.get('stderr', '')).strip()[-200:]}"
    if isinstance(value, dict) and "error" in value:
        return f"The tool failed: {value['error']}"
    if isinstance(value, dict) and "result" in value:
        return f"The result is {value['result']}."
    return f"The tool returned: {content}"


def _text_of(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _call_tokens(call: ToolCallDelta) -> int:
    return 8 + len(call.arguments) // 4
