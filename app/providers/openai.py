"""A provider for any OpenAI-compatible upstream, over a lean keep-alive pool (app/providers/http1.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

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
from app.providers.base import LLMChunk, LLMRequest, Usage
from app.providers.http1 import ConnectTimeout, Http1Pool, Stream, UpstreamConnectionError
from app.providers.openai_wire import error_message, parse_completion, parse_text_event, request_body, text_event

_DATA = b"data:"
_DATA_SP = b"data: "
_DONE = b"[DONE]"


class OpenAICompatibleProvider:
    def __init__(self, name: str, settings: ProviderSettings) -> None:
        assert settings.base_url is not None  # guaranteed by ProviderSettings validation
        self.name = name
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key is not None:
            self._headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        # Streamed and non-streamed calls on one lean keep-alive pool (app/providers/http1.py): aiohttp's
        # request machinery was a fifth of the chat route's CPU. No total timeout: a long stream is fine
        # as long as bytes keep coming (the read timeout is between bytes).
        self._pool = Http1Pool(
            settings.base_url,
            limit=settings.max_connections,
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
        )

    async def _complete(self, request: LLMRequest) -> LLMChunk:
        """A non-streamed call: one POST, its whole answer parsed into one chunk."""
        body = orjson.dumps(request_body(request))
        headers = tracing.outgoing_headers(self._headers, request_id_var.get())
        try:
            answer = await self._pool.post("/chat/completions", headers, body)
        except ConnectTimeout:
            raise UpstreamTimeout(f"{self.name}: no connection within the connect timeout") from None
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: upstream went silent past the read timeout") from None
        except UpstreamConnectionError as exc:
            raise UpstreamUnavailable(f"{self.name}: connection lost: {exc}") from None
        except OSError as exc:
            raise UpstreamUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None
        if answer.status >= 400:
            raise _status_error(self.name, answer.status, answer.body, answer.headers)
        return _plain_completion(answer.body) or parse_completion(answer.body)

    async def generate(self, request: LLMRequest) -> AsyncGenerator[LLMChunk, None]:
        if not request.stream:
            yield await self._complete(request)
            return
        try:
            # x-request-id, and with tracing on the model call's traceparent (W3C).
            headers = tracing.outgoing_headers(self._headers, request_id_var.get())
            # The body inline, not in a local: this generator lives as long as the stream, and orjson's
            # output is a 4 KB allocation however short the body (held, 4 KB more per stream).
            response = await self._pool.stream("/chat/completions", headers, orjson.dumps(request_body(request)))
        except ConnectTimeout:
            raise UpstreamTimeout(f"{self.name}: no connection within the connect timeout") from None
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: upstream went silent past the read timeout") from None
        except UpstreamConnectionError as exc:
            raise UpstreamUnavailable(f"{self.name}: connection lost: {exc}") from None
        except OSError as exc:
            raise UpstreamUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None

        try:
            if response.status >= 400:
                raise _status_error(self.name, response.status, await response.read_all(), response.headers)
            async for chunk in _read_event_stream(self.name, response, request.relay_model):
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: upstream went silent past the read timeout") from None
        except UpstreamConnectionError as exc:
            raise UpstreamUnavailable(f"{self.name}: connection lost: {exc}") from None
        finally:
            # Read to its end, the connection goes back to the pool; cancelled, abandoned or failed, it
            # is closed so the upstream stops generating.
            response.close()

    async def aclose(self) -> None:
        self._pool.close()


async def _read_event_stream(
    name: str, response: Stream, relay_model: str | None = None
) -> AsyncGenerator[LLMChunk, None]:
    """The chunks of an SSE body, as they come: what one read brought is folded into as few chunks as
    its events allow (a run of tokens is one chunk), so the layers above pay per read, not per token.
    A dropped connection fails only after the bytes received before it (tokens the client is sent, and
    counted)."""
    events = _EventStream(relay_model)
    while data := await response.read():
        for chunk in events.feed(data):
            yield chunk  # the usage chunk comes after the one with finish_reason
        events.raise_failure()
    if events.pending:  # a last event without its blank line
        for chunk in events.feed(b"\n\n"):
            yield chunk
        events.raise_failure()
    if not events.complete:
        raise UpstreamUnavailable(f"{name}: the stream ended before the response was complete")


class _EventStream:
    """The `data:` lines of an SSE body, as chunks, up to `[DONE]`.

    Tokens (parse_text_event's common shape) are read with orjson alone and folded, a run of them
    into one chunk; any other event is validated by parse_completion and is a chunk of its own. A
    failing event (an error chunk, malformed JSON) raises only after the chunks before it are out.
    """

    __slots__ = ("_failure", "_relay_model", "_tail", "done", "finished")

    def __init__(self, relay_model: str | None = None) -> None:
        self.done = False
        self.finished = False
        self._relay_model = relay_model  # None: no raw frames
        self._tail = b""  # an incomplete last line
        self._failure: Exception | None = None  # an event that failed, raised after those before it

    def raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    @property
    def complete(self) -> bool:
        return self.done or self.finished

    @property
    def pending(self) -> bool:
        return bool(self._tail)

    def feed(self, data: bytes) -> list[LLMChunk]:
        """The chunks of the complete lines read so far; a failing event stops there (raise_failure())."""
        if self._failure is not None:
            return []
        if self._tail:
            data = self._tail + data
        if b"\r" in data:  # CRLF line ends: line by line
            lines = data.split(b"\n")
            self._tail = lines.pop()
            return self._chunks([line[len(_DATA) :].strip() for line in lines if line.startswith(_DATA)])
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            self._tail = data
            return []
        events, self._tail = (data, b"") if end == len(data) else (data[:end], data[end:])
        if not self.done:
            folded = self._tokens(events)
            if folded is not None:
                return folded
        return self._chunks(self._payloads(events))

    def _tokens(self, events: bytes) -> list[LLMChunk] | None:
        """Whole events read at once, when they begin with a run of tokens, each one `data: ` line (what
        a read brings most of the time): the run as one chunk, with one parse for the events and the
        bytes relayed as they came; the events after the run (the usage chunk, say) one by one, and
        comments before it and a last [DONE] skipped. None: one by one from the start."""
        start = 0
        while events.startswith(b":", start):  # comments (": stream open", keep-alives)
            start = events.index(b"\n\n", start) + 2
        done = events.endswith(b"\n\ndata: [DONE]\n\n") or events[start:] == b"data: [DONE]\n\n"
        body = events[start : len(events) - len(b"data: [DONE]\n\n")] if done else events[start:]
        if not body.startswith(b"data: {") or not body.endswith(b"}\n\n"):
            return None
        count = body.count(b"\n\ndata: ") + 1
        if body.count(b"\n") != 2 * count:
            return None  # other fields, comments, multi-line events
        try:
            parsed = orjson.loads(b"[" + body[6:-2].replace(b"\n\ndata: ", b",") + b"]")
        except orjson.JSONDecodeError:
            return None
        if type(parsed) is not list or len(parsed) != count:
            return None
        texts: list[str] = []
        finish: str | None = None
        relay_model, renamed = self._relay_model, False
        for obj in parsed:
            common = None if finish is not None else text_event(obj)  # nothing after a finish_reason
            if common is None:
                break
            texts.append(common[0])
            finish = common[1]
            if relay_model is not None and obj.get("model") != relay_model:
                renamed = True
        run = len(texts)
        if not run:
            return None
        rest = b""
        if run < count:
            events_of = body.split(b"\n\n")
            body, rest = b"\n\n".join(events_of[:run]) + b"\n\n", b"\n\n".join(events_of[run:])
        raw: list[bytes] | None = None
        if relay_model is not None:
            frame = self._renamed(body, parsed[:run]) if renamed else body
            if frame is None:
                return None
            raw = [frame]  # one frame for all of them (LLMChunk.truncate splits it if it must)
        if finish is not None:
            self.finished = True
        out = [LLMChunk(text="".join(texts) or None, finish_reason=finish, texts=texts, raw=raw)]
        if rest:
            out += self._chunks(self._payloads(rest))
        if done and self._failure is None:
            self.done = True  # read on to the end of the body, so the connection can be reused
        return out

    def _renamed(self, events: bytes, parsed: list[dict[str, object]]) -> bytes | None:
        """The events with their one model name replaced by the public one, in the bytes; None if
        they do not all carry the same one once as `"model":` (the events are then re-serialised)."""
        model = parsed[0].get("model")
        if type(model) is not str or any(obj.get("model") != model for obj in parsed):
            return None
        name, public = orjson.dumps(model), orjson.dumps(self._relay_model)
        for key in (b'"model":', b'"model": '):
            if events.count(key + name) == len(parsed) and events.count(b'"model"') == len(parsed):
                return events.replace(key + name, key + public)
        return None

    def _chunks(self, payloads: list[bytes]) -> list[LLMChunk]:
        """One event at a time: runs of tokens folded, any other event a chunk of its own."""
        out: list[LLMChunk] = []
        texts: list[str] = []
        raws: list[bytes] | None = [] if self._relay_model is not None else None
        try:
            for payload in payloads:
                if self.done:
                    break  # anything after [DONE]
                if payload == _DONE:
                    self.done = True  # read on to the end of the body, so the connection can be reused
                    continue
                common = parse_text_event(payload)
                if common is not None:
                    text, finish, obj = common
                    texts.append(text)
                    if raws is not None:
                        raws.append(self._frame(payload, obj))
                    if finish is not None:
                        self.finished = True
                        out.append(_folded(texts, raws, finish))
                        texts, raws = [], ([] if raws is not None else None)
                    continue
                if texts:
                    out.append(_folded(texts, raws, None))
                    texts, raws = [], ([] if raws is not None else None)
                chunk = parse_completion(payload)
                if raws is not None:
                    chunk.raw = [self._frame(payload, None)]
                self.finished = self.finished or chunk.finish_reason is not None
                out.append(chunk)
        except Exception as exc:  # raised by the caller once the chunks before it are out
            self._failure = exc
        if texts:
            out.append(_folded(texts, raws, None))
        return out

    def _payloads(self, events: bytes) -> list[bytes]:
        """The `data:` fields of whole events (blank separators, comments, event:/id: fields are not
        events' data)."""
        payloads: list[bytes] = []
        for event in events.split(b"\n\n"):
            if event.startswith(_DATA_SP) and b"\n" not in event:  # one `data: ` line: the common case
                payloads.append(event[len(_DATA_SP) :])
                continue
            for line in event.split(b"\n"):
                if line.startswith(_DATA):
                    payloads.append(line[len(_DATA) :].strip())
        return payloads

    def _frame(self, payload: bytes, obj: dict[str, object] | None) -> bytes:
        """The event as the client gets it: the upstream's JSON, but for a model name not the public one."""
        if obj is None:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return b"data: " + payload + b"\n\n"
            if type(obj) is not dict:
                return b"data: " + payload + b"\n\n"
        if obj.get("model") != self._relay_model:
            obj["model"] = self._relay_model
            payload = orjson.dumps(obj)
        return b"data: " + payload + b"\n\n"


def _folded(texts: list[str], raws: list[bytes] | None, finish: str | None) -> LLMChunk:
    return LLMChunk(text="".join(texts) or None, finish_reason=finish, texts=texts, raw=raws)


def _status_error(name: str, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamError:
    """`headers` by lower-case name."""
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
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _plain_completion(raw: bytes) -> LLMChunk | None:
    """A whole completion of the common shape, read with orjson alone: one choice, a message whose
    content is a string or null and no tool calls, integer usage, no error. Anything else (or
    anything odd) is None: parse_completion's, whose models validate it (4.8 % of the chat route's
    CPU at concurrency 1); for what it takes, the same chunk as parse_completion's."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or value.get("error") is not None:
        return None
    choices = value.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("delta") is not None or type(choice.get("index", 0)) is not int:
        return None
    message, finish_reason = choice.get("message"), choice.get("finish_reason")
    if type(message) is not dict or message.get("tool_calls") is not None:
        return None
    content = message.get("content")
    if (content is not None and type(content) is not str) or (
        finish_reason is not None and type(finish_reason) is not str
    ):
        return None
    chunk = LLMChunk(text=content or None, finish_reason=finish_reason)
    usage = value.get("usage")
    if usage is not None:
        if type(usage) is not dict:
            return None
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        details = usage.get("prompt_tokens_details")
        cached = 0
        if details is not None:
            if type(details) is not dict:
                return None
            cached = details.get("cached_tokens", 0)
        if type(prompt) is not int or type(completion) is not int or type(cached) is not int:
            return None
        chunk.usage = Usage(prompt, completion, cached)
    return chunk
