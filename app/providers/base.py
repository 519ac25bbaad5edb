"""The provider protocol and the normalised request, chunk and response every provider speaks.

A provider yields `LLMChunk`s for both streamed and non-streamed calls (a non-streamed call is one
chunk holding the whole message), so every consumer processes both through the same code path.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, Any]  # an OpenAI chat message, passed through as the wire format has it


@dataclass(slots=True)
class LLMRequest:
    model: str  # the upstream's own model name
    messages: list[Message]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function definitions
    tool_choice: Any = None
    # Other OpenAI parameters the caller sent (top_p, stop, seed, response_format, ...).
    extra: dict[str, Any] = field(default_factory=dict)
    # A stream relayed to an OpenAI-compatible client: the public model name its chunks carry (a
    # provider that can relays the upstream's own SSE events in LLMChunk.raw, with this name).
    relay_model: str | None = None


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # a fragment of the JSON arguments; fragments concatenate


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the upstream's prompt cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens


@dataclass(slots=True)
class LLMChunk:
    text: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    # A streamed chunk may fold several upstream events read at once (text deltas, the last of them
    # perhaps with the finish_reason): `texts` has each event's text ("" for none), `text` their
    # concatenation. None: the chunk is one event.
    texts: list[str] | None = None
    # With LLMRequest.relay_model: the upstream's SSE events this chunk was read from, the JSON as it
    # came but for the model name: a frame (b"data: ...\n\n") per event, or one for all of them.
    raw: list[bytes] | None = None

    @property
    def pieces(self) -> list[str]:
        """The text deltas, one per upstream event that had text."""
        if self.texts is not None:
            return [text for text in self.texts if text]
        return [self.text] if self.text else []

    def truncate(self, events: int) -> None:
        """Keep only the first `events` of the events this chunk folds (texts and raw)."""
        assert self.texts is not None
        self.texts = self.texts[:events]
        self.text = "".join(self.texts) or None
        if self.raw is not None:
            if len(self.raw) == 1 and events < len(self.raw[0].split(b"\n\n")) - 1:
                # One frame for all the events of a read (each a `data: ` line and a blank line).
                self.raw = [event + b"\n\n" for event in self.raw[0].split(b"\n\n")[:-1]]
            self.raw = self.raw[:events]
        self.finish_reason = None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (it may be invalid)


@dataclass(slots=True)
class LLMResponse:
    text: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    usage_estimated: bool = False


class ResponseBuilder:
    """Folds chunks into one response; the same for streamed and non-streamed calls."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, ToolCallDelta] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, chunk: LLMChunk) -> None:
        if chunk.text:
            self._text.append(chunk.text)
        if chunk.tool_calls:
            for delta in chunk.tool_calls:
                current = self._calls.get(delta.index)
                if current is None:
                    self._calls[delta.index] = ToolCallDelta(delta.index, delta.id, delta.name, delta.arguments)
                    continue
                current.id = current.id or delta.id
                current.name = current.name or delta.name
                current.arguments += delta.arguments
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage

    @property
    def text(self) -> str:
        return "".join(self._text)

    def build(self, estimate_usage: Callable[[], Usage]) -> LLMResponse:
        """The response; `estimate_usage` is called only when the upstream reported none."""
        calls = [
            ToolCall(id=d.id or f"call_{d.index}", name=d.name or "", arguments=d.arguments or "{}")
            for _, d in sorted(self._calls.items())
        ]
        finish = self.finish_reason or ("tool_calls" if calls else "stop")
        if self.usage is None:
            return LLMResponse(self.text, calls, finish, estimate_usage(), usage_estimated=True)
        return LLMResponse(self.text, calls, finish, self.usage)


class Provider(Protocol):
    """An LLM backend. Implementations translate one wire format; retries and limits wrap them."""

    name: str

    def generate(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        """Yield the response as chunks; raise an `UpstreamError` subclass on failure."""
        ...

    async def aclose(self) -> None: ...
