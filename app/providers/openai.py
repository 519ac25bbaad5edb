"""A provider for any OpenAI-compatible upstream, over the process's one pooled aiohttp session."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import aiohttp
import orjson

from app.config import ProviderSettings
from app.errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.middleware import request_id_var
from app.observability import tracing
from app.providers.base import LLMChunk, LLMRequest
from app.providers.openai_wire import error_message, parse_completion, request_body

_DATA = b"data:"
_DONE = b"[DONE]"


class OpenAICompatibleProvider:
    def __init__(self, name: str, settings: ProviderSettings, session: aiohttp.ClientSession) -> None:
        assert settings.base_url is not None  # guaranteed by ProviderSettings validation
        self.name = name
        self._session = session
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key is not None:
            self._headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        # No total timeout: a long stream is fine as long as bytes keep coming.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )

    async def generate(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        body = orjson.dumps(request_body(request))
        try:
            # x-request-id, and with tracing on the model call's traceparent (W3C).
            headers = tracing.outgoing_headers(self._headers, request_id_var.get())
            response = await self._session.post(self._url, data=body, headers=headers, timeout=self._timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: no connection within the connect timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None

        finished = False
        try:
            if response.status >= 400:
                raise _status_error(self.name, response.status, await response.read(), response.headers)
            if request.stream:
                async for chunk in _read_event_stream(self.name, response):
                    yield chunk
            else:
                yield parse_completion(await response.read())
            finished = True
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: upstream went silent past the read timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"{self.name}: connection lost: {type(exc).__name__}") from None
        finally:
            if finished:
                response.release()
            else:
                # Cancelled, abandoned or failed: drop the connection so the upstream stops generating.
                response.close()

    async def aclose(self) -> None:
        """The shared session belongs to the lifespan; nothing of our own to close."""


async def _read_event_stream(name: str, response: aiohttp.ClientResponse) -> AsyncGenerator[LLMChunk, None]:
    events = _EventStream()
    try:
        async for line in response.content:
            chunk = events.parse(line)
            if chunk is not None:
                yield chunk  # the usage chunk comes after the one with finish_reason
    except aiohttp.ClientError:
        # aiohttp raises a dropped connection's error before handing out lines it had already
        # received (its readline checks the error first), so tokens the client was never sent
        # would be lost, and uncounted. Deliver the whole lines still buffered, then fail.
        for line in _buffered_lines(response.content):
            chunk = events.parse(line)
            if chunk is not None:
                yield chunk
        raise
    if not events.complete:
        raise UpstreamUnavailable(f"{name}: the stream ended before the response was complete")


class _EventStream:
    """The `data:` lines of an SSE body, as chunks, up to `[DONE]`."""

    __slots__ = ("done", "finished")

    def __init__(self) -> None:
        self.done = False
        self.finished = False

    @property
    def complete(self) -> bool:
        return self.done or self.finished

    def parse(self, line: bytes) -> LLMChunk | None:
        if self.done or not line.startswith(_DATA):
            return None  # blank separators, comments, event:/id: fields, anything after [DONE]
        payload = line[len(_DATA) :].strip()
        if payload == _DONE:
            self.done = True  # read on to the end of the body, so the connection can be reused
            return None
        chunk = parse_completion(payload)
        self.finished = self.finished or chunk.finish_reason is not None
        return chunk


def _buffered_lines(content: aiohttp.StreamReader) -> list[bytes]:
    """The complete lines a failed stream still holds (a torn last line is dropped)."""
    read_buffered = getattr(content, "_read_nowait", None)  # aiohttp's own, which skips the error check
    if read_buffered is None:
        return []
    data: bytes = read_buffered(-1)
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


def _status_error(name: str, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamError:
    message = f"{name} answered {status}: {error_message(raw)}"
    retry_after = _retry_after(headers)
    if status == 429:
        return UpstreamRateLimited(message, retry_after=retry_after or 1.0)
    if status in (401, 403):
        return UpstreamAuthFailed(message)
    if 400 <= status < 500:
        return UpstreamRejected(message)
    return UpstreamError(message, retry_after=retry_after)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
