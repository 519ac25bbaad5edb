"""A lean HTTP/1.1 client for the upstream calls: one request, and its answer read whole or as it comes.

aiohttp's ClientSession.request was a fifth of the chat route's CPU per request (py-spy, JSON at
concurrency 64) and a fifth of a streamed task's CPU in a storm of new streams (1,000 opened a
second): URL and header objects, cookie jar, tracing hooks, timer contexts and a
ClientRequest/ClientResponse pair for every call. An upstream call needs much less: a pooled
keep-alive connection, one write, and httptools (uvicorn's own C parser) reading the answer.

The same contract as the aiohttp call it replaces: a connect timeout, a read timeout between bytes,
the pool's size, keep-alive (an idle connection is reused, closed after `keepalive_s`), and a
connection that did not end its answer (cancelled, timed out, failed) is closed, never reused, so
the upstream stops. A streamed body is read with flow control (the socket is paused while more than
64 KB wait for a reader, and silence while paused is not a timeout), and the bytes received before
a failure are read before the failure is raised. As aiohttp does for a POST, a request is never
sent twice: a kept-alive connection the upstream closes as the request goes out fails the call
(ModelCall's retry policy decides what happens next).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools


class UpstreamConnectionError(ConnectionError):
    """The connection was lost, or the answer malformed, before the answer was complete."""


class ConnectTimeout(TimeoutError):
    """No connection within the connect timeout."""


_HIGH_WATER = 64 * 1024  # a streamed body's bytes waiting for its reader before the socket is paused


_CLOSED_EARLY = "the connection was closed before the response ended"


class Answer:
    __slots__ = ("body", "raw_headers", "status")

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.raw_headers, self.body = status, raw_headers, body

    @property
    def headers(self) -> dict[str, str]:
        """By lower-case name (decoded only when asked: an error's Retry-After)."""
        return _by_name(self.raw_headers)


def _by_name(raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw_headers}


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_buffered",
        "_done",
        "_ended",
        "_error",
        "_headers",
        "_headers_done",
        "_heard",
        "_loop",
        "_parser",
        "_paused",
        "_read_timeout",
        "_reader",
        "_stray",
        "_streaming",
        "_timer",
        "closed",
        "idle_since",
        "received",
        "transport",
    )

    def __init__(self, read_timeout: float | None) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received = False
        self._read_timeout = read_timeout
        self._loop = asyncio.get_running_loop()
        self._heard = 0.0  # the loop's time of the last bytes received
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[Answer] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._body: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        # A streamed answer: its body as it comes, for one reader.
        self._streaming = False
        self._buffered = 0  # bytes in _body not read yet
        self._reader: asyncio.Future[None] | None = None  # the reader waiting for bytes
        self._ended = False  # the body is complete (the reader gets b"" once _body is empty)
        self._error: BaseException | None = None  # raised to the reader once _body is empty
        self._paused = False
        self._stray = False  # bytes past the end of the answer came in the same read

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no asyncio.Transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        self._heard = self._loop.time()  # the read timer looks at this when it fires
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101: nothing here asks to switch protocols
            self._fail(UpstreamConnectionError("malformed response: an unasked-for protocol switch"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectionError(f"malformed response: {exc}"))
        if self._stray:  # the answer ended and more came after it: nobody asked for it
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        done, parser = self._done, self._parser
        if self._streaming and done is not None and done.done():
            if not self._ended and self._error is None:
                if parser is not None and self._until_close():
                    self._ended = True
                else:
                    self._error = UpstreamConnectionError(_CLOSED_EARLY)
                self._wake_reader()
            return
        if done is None or done.done():
            return
        if parser is not None and self._until_close():
            # A body without Content-Length or chunking ends where the connection does (HTTP/1.0 style).
            done.set_result(Answer(parser.get_status_code(), self._headers, b"".join(self._body)))
            return
        done.set_exception(UpstreamConnectionError(_CLOSED_EARLY))

    def _until_close(self) -> bool:
        if not self._headers_done:
            return False
        headers = {name.lower(): value.lower() for name, value in self._headers}
        if b"content-length" in headers:
            return False
        # Only a chunked body ends by itself (RFC 9112 6.3): any other transfer coding ends with the connection.
        return not headers.get(b"transfer-encoding", b"").rstrip().endswith(b"chunked")

    # httptools callbacks (after the end of the answer, they are for bytes nobody asked for: _stray)

    def _interim(self) -> bool:
        """A 1xx answer (100 Continue, 103 Early Hints): not the answer, which follows it (RFC 9110 15.2)."""
        assert self._parser is not None
        return 100 <= self._parser.get_status_code() < 200

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._parser is None:
            self._stray = True
        elif not self._headers_done:  # after them, a chunked body's trailers: not the answer's headers
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser, done = self._parser, self._done
        if parser is None:
            self._stray = True
            return
        self._headers_done = True
        if self._streaming and done is not None and not done.done() and not self._interim():
            done.set_result(Answer(parser.get_status_code(), self._headers, b""))

    def on_body(self, body: bytes) -> None:
        if self._parser is None:
            self._stray = True
            return
        self._body.append(body)
        if self._streaming:
            self._buffered += len(body)
            if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake_reader()

    def on_message_complete(self) -> None:
        parser, done = self._parser, self._done
        if parser is None or done is None:
            self._stray = True
            return
        if self._interim():  # the answer itself comes next, on the same parser
            self._headers, self._headers_done, self._body, self._buffered = [], False, [], 0
            return
        self._cancel_timer()
        keep = parser.should_keep_alive()
        self._parser = None
        if self._streaming:
            self._ended = True
            self._wake_reader()
            if not keep:
                self.close()
            return
        if not done.done():
            done.set_result(Answer(parser.get_status_code(), self._headers, b"".join(self._body)))
        if not keep:
            self.close()

    # requests

    async def exchange(self, request: bytes, *, stream: bool = False) -> Answer:
        """The whole answer; or with `stream`, its status and headers, the body then read with read()."""
        assert self.transport is not None
        done: asyncio.Future[Answer] = self._loop.create_future()
        self._done = done
        self._parser = httptools.HttpResponseParser(self)
        self._body, self._headers, self.received, self._headers_done = [], [], False, False
        self._streaming, self._buffered, self._ended, self._error, self._stray = stream, 0, False, None, False
        self.transport.write(request)
        self._arm()
        try:
            return await done
        finally:
            if not stream:
                self._done = None
            if not done.done() or done.cancelled() or done.exception() is not None:
                self.close()  # an answer not read to its end: the connection goes, the upstream stops

    async def read(self) -> bytes:
        """The next bytes of a streamed body (all that arrived since the last read), b"" at its end; the
        failure (TimeoutError, UpstreamConnectionError) once the bytes received before it are read."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            reader = self._reader = self._loop.create_future()
            try:
                await reader
            finally:
                self._reader = None
        body, self._body, self._buffered = self._body, [], 0
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self._heard = self._loop.time()  # the silence while paused was the reader's, not the upstream's
            self.transport.resume_reading()
        return body[0] if len(body) == 1 else b"".join(body)

    def end_stream(self) -> None:
        """The reader is done with a streamed answer: unless its body was read to its end, the connection
        is closed (the upstream stops, and the pool does not reuse it)."""
        reusable = self._ended and self._error is None and not self._body and not self.closed
        self._done, self._streaming, self._body = None, False, []
        if not reusable:
            self.close()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _arm(self) -> None:
        """One timer per answer, not one per read: when it fires it checks the time of the last read
        (re-arming a timer on every read was 6 % of the chat route's CPU at concurrency 1)."""
        if self._read_timeout is not None:
            self._heard = self._loop.time()
            self._timer = self._loop.call_at(self._heard + self._read_timeout, self._check_silence)

    def _check_silence(self) -> None:
        assert self._read_timeout is not None
        if self._paused:
            self._heard = self._loop.time()  # the reader is behind: the upstream is not silent
        due = self._heard + self._read_timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_silence)
            return
        self._timer = None
        self._fail(TimeoutError())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        elif self._streaming and not self._ended and self._error is None:
            self._error = exc
            self._wake_reader()
        self.close()

    def close(self) -> None:
        self._cancel_timer()
        if self._streaming and self._parser is not None and not self._ended and self._error is None:
            self._error = UpstreamConnectionError(_CLOSED_EARLY)
            self._wake_reader()
        self._parser = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class Http1Pool:
    """Keep-alive connections to one origin (scheme, host, port), at most `limit` at once."""

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        connect_timeout: float | None,
        read_timeout: float | None,
        keepalive_s: float = 30.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (host if default_port else f"{host}:{self.port}").encode("latin-1")
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_s = keepalive_s
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def head(self, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = [b"POST ", (self.base_path + path).encode("latin-1"), b" HTTP/1.1\r\nHost: ", self._host_header]
        for name, value in headers.items():
            lines += (b"\r\n", name.encode("latin-1"), b": ", value.encode("latin-1"))
        lines += (b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        return b"".join(lines)

    async def post(self, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """POST `body` and read the whole answer; UpstreamConnectionError or TimeoutError when it fails."""
        request = self.head(path, headers, body)
        connection = await self._acquire()
        try:
            return await connection.exchange(request)
        finally:
            self._release(connection)

    async def stream(self, path: str, headers: Mapping[str, str], body: bytes) -> Stream:
        """POST `body` and read the answer's status and headers; its body is then the Stream's to read,
        and the Stream must be closed (it gives the connection back, or closes it)."""
        request = self.head(path, headers, body)
        connection = await self._acquire()
        try:
            answer = await connection.exchange(request, stream=True)
        except BaseException:
            connection.end_stream()
            self._release(connection)
            raise
        return Stream(self, connection, answer)

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the likeliest to be alive
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
            self._open -= 1
        while self._open >= self._limit:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the wake-up goes to the next in line
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._idle:
                return await self._acquire()
        self._open += 1
        try:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _transport, connection = await loop.create_connection(
                        lambda: _Connection(self._read_timeout),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None,
                    )
            except TimeoutError:
                raise ConnectTimeout() from None
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or self._closed:
            connection.close()
            self._open -= 1
        else:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._open -= 1


class Stream:
    """A streamed answer: status and headers, then its body read as it comes."""

    __slots__ = ("_connection", "_pool", "raw_headers", "status")

    def __init__(self, pool: Http1Pool, connection: _Connection, answer: Answer) -> None:
        self._pool: Http1Pool | None = pool
        self._connection = connection
        self.status, self.raw_headers = answer.status, answer.raw_headers

    @property
    def headers(self) -> dict[str, str]:
        """By lower-case name."""
        return _by_name(self.raw_headers)

    async def read(self) -> bytes:
        """The bytes that arrived since the last read, b"" at the end of the body."""
        return await self._connection.read()

    async def read_all(self) -> bytes:
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Gives the connection back if the body was read to its end; otherwise closes it (the upstream
        stops). Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._connection.end_stream()
            pool._release(self._connection)
