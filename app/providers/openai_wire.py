"""The OpenAI chat-completions wire format: request bodies out, validated responses and chunks in."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from app.errors import UpstreamError, UpstreamProtocolError
from app.providers.base import LLMChunk, LLMRequest, ToolCallDelta, Usage


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class WireFunction(_Wire):
    name: str | None = None
    arguments: str | None = None


class WireToolCall(_Wire):
    index: int | None = None
    id: str | None = None
    function: WireFunction | None = None


class WireMessage(_Wire):
    content: str | None = None
    tool_calls: list[WireToolCall] | None = None


class WireChoice(_Wire):
    index: int = 0
    message: WireMessage | None = None
    delta: WireMessage | None = None
    finish_reason: str | None = None


class WirePromptDetails(_Wire):
    cached_tokens: int = 0


class WireUsage(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: WirePromptDetails | None = None


class _ErrorDetail(_Wire):
    message: str | None = None


class _ErrorBody(_Wire):
    error: _ErrorDetail | str | None = None
    message: str | None = None


class WireCompletion(_Wire):
    """Both a whole completion and a streamed chunk: they differ only in message vs delta."""

    choices: list[WireChoice] = []
    usage: WireUsage | None = None
    # Some upstreams report a failure in-band, as a chunk with an error object.
    error: _ErrorDetail | None = None


def request_body(request: LLMRequest) -> dict[str, Any]:
    body: dict[str, Any] = dict(request.extra)
    body["model"] = request.model
    body["messages"] = request.messages
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.tools:
        body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
    if request.stream:
        body["stream"] = True
        # Ask for the final usage chunk: cost accounting depends on it.
        body["stream_options"] = {"include_usage": True}
    return body


def parse_completion(raw: bytes | str) -> LLMChunk:
    """A whole (non-streamed) completion or one streamed chunk, as an LLMChunk."""
    try:
        wire = WireCompletion.model_validate_json(raw)
    except ValidationError as exc:
        raise UpstreamProtocolError(f"unreadable completion from upstream: {_first_error(exc)}") from None
    if wire.error is not None:
        raise UpstreamError(f"upstream reported an error mid-response: {wire.error.message}")
    chunk = LLMChunk()
    if wire.usage is not None:
        details = wire.usage.prompt_tokens_details
        chunk.usage = Usage(
            wire.usage.prompt_tokens, wire.usage.completion_tokens, details.cached_tokens if details else 0
        )
    if not wire.choices:
        return chunk
    choice = wire.choices[0]
    message = choice.delta if choice.delta is not None else choice.message
    chunk.finish_reason = choice.finish_reason
    if message is None:
        return chunk
    chunk.text = message.content or None
    if message.tool_calls:
        chunk.tool_calls = [
            ToolCallDelta(
                index=call.index if call.index is not None else position,
                id=call.id,
                name=call.function.name if call.function else None,
                arguments=(call.function.arguments or "") if call.function else "",
            )
            for position, call in enumerate(message.tool_calls)
        ]
    return chunk


def parse_text_event(payload: bytes) -> tuple[str, str | None, dict[str, Any]] | None:
    """A streamed chunk of the common shape, read without the models: (text, finish_reason, the object).

    The common shape is one choice of index 0 whose delta holds at most a string content (and a
    role), perhaps with a string finish_reason, and no usage or error: a token. Anything else (tool
    calls, the usage chunk, an error, malformed or odd JSON) is None: parse_completion's, which
    validates it, and reads a chunk of the common shape the same way.
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    common = text_event(obj)
    return None if common is None else (common[0], common[1], obj)


def text_event(obj: Any) -> tuple[str, str | None] | None:
    """(text, finish_reason) of a parsed chunk of parse_text_event's common shape, else None."""
    if type(obj) is not dict:
        return None
    choices = obj.get("choices")
    if type(choices) is not list or len(choices) != 1 or "error" in obj or obj.get("usage") is not None:
        return None
    choice = choices[0]
    if type(choice) is not dict:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict:
        return None
    content = delta.get("content")
    finish = choice.get("finish_reason")
    index = choice.get("index", 0)
    if (
        (content is not None and type(content) is not str)
        or (finish is not None and type(finish) is not str)
        or type(index) is not int
        or index != 0
        or delta.get("tool_calls") is not None
    ):
        return None
    return content or "", finish


def error_message(raw: bytes) -> str:
    """The human part of an upstream error body, whatever shape it has."""
    try:
        body = _ErrorBody.model_validate_json(raw)
    except ValidationError:
        return raw[:300].decode(errors="replace")
    if isinstance(body.error, _ErrorDetail):
        return body.error.message or ""
    return str(body.error or body.message or "")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
