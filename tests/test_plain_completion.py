"""Whole completions of the common shape are read without the models (app/providers/openai.py), into the
very chunk parse_completion makes of them; anything else is left to parse_completion."""

from __future__ import annotations

import orjson
import pytest

from app.providers.openai import _plain_completion
from app.providers.openai_wire import parse_completion

COMMON = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}


def _with(path: tuple[str | int, ...], value: object) -> bytes:
    body = orjson.loads(orjson.dumps(COMMON))
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return orjson.dumps(body)


TAKEN = [
    orjson.dumps(COMMON),
    _with(("usage", "prompt_tokens_details"), {"cached_tokens": 4}),
    _with(("usage", "prompt_tokens_details"), None),
    _with(("usage",), None),
    _with(("choices", 0, "message", "content"), None),
    _with(("choices", 0, "message", "content"), ""),
    _with(("choices", 0, "finish_reason"), None),
    _with(("choices", 0, "finish_reason"), "length"),
    _with(("usage", "completion_tokens"), 0),
    _with(("error",), None),
]

LEFT = [
    b"not json",
    b"[]",
    _with(("choices",), []),
    _with(("choices",), [COMMON["choices"][0], COMMON["choices"][0]]),
    _with(("choices", 0, "message", "tool_calls"), [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]),
    _with(("choices", 0, "message", "content"), [{"type": "text", "text": "Hi"}]),
    _with(("choices", 0, "message", "content"), 7),
    _with(("choices", 0, "message"), None),
    _with(("choices", 0, "delta"), {"content": "Hi"}),
    _with(("choices", 0, "index"), "0"),
    _with(("choices", 0, "finish_reason"), 1),
    _with(("usage", "prompt_tokens"), "12"),
    _with(("usage", "prompt_tokens"), 12.0),
    _with(("usage", "prompt_tokens"), None),
    _with(("usage", "prompt_tokens"), True),
    _with(("usage", "prompt_tokens_details"), {"cached_tokens": "4"}),
    _with(("usage",), "lots"),
    _with(("error",), {"message": "boom"}),
]


def _fields(chunk: object) -> dict[str, object]:
    return {name: getattr(chunk, name) for name in ("text", "tool_calls", "finish_reason", "usage", "texts", "raw")}


@pytest.mark.parametrize("raw", TAKEN)
def test_the_common_shape_reads_as_parse_completion_reads_it(raw: bytes) -> None:
    plain = _plain_completion(raw)
    assert plain is not None
    assert _fields(plain) == _fields(parse_completion(raw))


@pytest.mark.parametrize("raw", LEFT)
def test_anything_else_is_left_to_parse_completion(raw: bytes) -> None:
    assert _plain_completion(raw) is None  # parse_completion validates it, or refuses it, as it always did
