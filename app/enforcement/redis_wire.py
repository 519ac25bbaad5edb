"""The limiter's Lua scripts on Redis without redis-py's per-command machinery.

Every request on Redis limits runs two scripts (admit, settle). Through redis-py's asyncio client one
admit cost 136 us of CPU at concurrency 64, through this one 39, the EVALSHA exchange alone 13
(`python -m benchmarks.redis_client`): redis-py's pool checkout under an `asyncio.timeout`, a
deprecated-arguments wrapper, the retry, the health check and the pure-Python parser were 40 % of a
chat request's CPU with Redis limits. This client does the exchange and what the failure policy needs, nothing else:

- a few connections of its own, pipelined: a command goes to the connection with the fewest commands
  waiting, written at once if none is, else with the other commands of the event-loop tick in one
  write, and replies are matched to commands in order;
- one timer per command: past `timeout_s` it fails with TimeoutError and its connection is closed,
  with every command waiting on it (a late reply would be taken for the next command's);
- a connection the server closes (a restart, a kill) is dropped when it closes and another one is
  opened by the next command, so a restart fails only the commands in flight at that moment, and no
  command is ever sent twice (an admit sent twice would count a request twice);
- NOSCRIPT (a restarted or flushed server) is answered by sending the script itself;
- failures are what the failure policy counts as "the backend is down" (ConnectionError,
  TimeoutError, OSError) and, for an error reply, redis-py's ResponseError.

Only plain `redis://host:port/db` URLs, with a password or not, are served here (`supports`); for
anything else (TLS, a Unix socket, query options) the limiter keeps redis-py's client.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.exceptions import ResponseError

CONNECTIONS = 4


def supports(url: str) -> bool:
    """Whether this client can serve `url` (else redis-py's does)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises here
    except ValueError:
        return False
    database = parts.path.strip("/")
    return (
        parts.scheme == "redis"
        and not parts.query
        and not parts.fragment
        and parts.hostname is not None
        and (database == "" or database.isdigit())  # anything else: redis-py's to refuse, at the start
    )


class _ErrorReply(str):
    """An error reply (`-ERR ...`): a value, so that the reply is consumed in order, raised by the caller."""

    __slots__ = ()


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.closed = False
        self._outgoing: list[bytes] = []  # commands of this tick not yet written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def send(self, command: bytes) -> None:
        """Write `command` now if the connection is idle, else with the others of this event-loop tick:
        at concurrency 64 a write (a syscall) per command was 7 % of a request's CPU."""
        assert self.transport is not None
        if not self.waiting and not self._outgoing:
            self.transport.write(command)  # nothing in flight: no reason to wait (concurrency 1)
            return
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(command)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if not self.closed and self.transport is not None:  # closed: its commands have failed already
            self.transport.write(b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        waiting = self.waiting
        while buffer:
            try:
                value, end = parse(buffer, 0)
            except (ValueError, IndexError):
                self.fail(ConnectionError("Redis sent a reply this client cannot read"))
                return
            if end < 0:
                break
            buffer = buffer[end:]
            if not waiting:
                self.fail(ConnectionError("Redis sent a reply nothing was waiting for"))
                return
            future = waiting.popleft()
            if not future.done():  # done: its caller gave up (a timeout fails the connection instead)
                future.set_result(value)
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_waiting(ConnectionError(f"Redis closed the connection ({exc or 'end of stream'})"))

    def fail(self, error: BaseException) -> None:
        """Close the connection now, failing every command waiting on it with `error`."""
        self.closed = True
        self._fail_waiting(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, error: BaseException) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                # One exception object each: raised in several tasks, a shared one collects their tracebacks.
                future.set_exception(type(error)(*error.args))


class RespScripts:
    """Scripts by EVALSHA over a few pipelined connections; `script(source)` makes one callable as
    redis-py's `register_script` does (`await script(keys=[...], args=[...])`)."""

    def __init__(self, url: str, *, timeout_s: float, connections: int = CONNECTIONS) -> None:
        if not supports(url):
            raise ValueError("RespScripts serves plain redis:// URLs only")
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._setup: list[bytes] = []  # sent on every new connection, before any script
        if parts.password:  # `redis://:@host` sends no AUTH, as redis-py
            credentials = [unquote(parts.username)] if parts.username else []
            self._setup.append(pack([b"AUTH", *(_arg(part) for part in (*credentials, unquote(parts.password)))]))
        database = parts.path.strip("/")
        if database not in ("", "0"):
            self._setup.append(pack([b"SELECT", database.encode()]))
        self._timeout_s = timeout_s
        self._size = connections
        self._open: list[_Connection] = []
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    def script(self, source: str | bytes) -> _Script:
        return _Script(self, source)

    async def call(self, command: bytes) -> Any:
        """Send one packed command and return its reply (an _ErrorReply for an error reply)."""
        connection = self._pick()
        if connection is None:
            try:
                connection = await self._another()
            except (OSError, ResponseError):  # the new connection failed: an open one may still carry it
                connection = self._any_open()
                if connection is None:
                    raise
        return await self._exchange(connection, command)

    async def aclose(self) -> None:
        # A connect in progress is left to finish: it sees the client closed and fails with ConnectionError
        # (a failure the limiter's policy knows), where cancelling it would cancel its waiting callers.
        self._closed = True
        for connection in self._open:
            connection.fail(ConnectionError("the Redis client is closed"))
        self._open.clear()

    def _any_open(self) -> _Connection | None:
        return next((connection for connection in self._open if not connection.closed), None)

    def _pick(self) -> _Connection | None:
        """The open connection with the fewest commands waiting; None to open another (none is open, or
        every one has commands waiting and there is room for one more)."""
        best: _Connection | None = None
        pruned = False
        for connection in self._open:
            if connection.closed:
                pruned = True
                continue
            if best is None or len(connection.waiting) < len(best.waiting):
                best = connection
        if pruned:
            self._open = [connection for connection in self._open if not connection.closed]
        if best is not None and (not best.waiting or len(self._open) >= self._size or self._connecting is not None):
            return best
        return None

    async def _another(self) -> _Connection:
        if self._closed:
            raise ConnectionError("the Redis client is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        # Shielded: one caller cancelled must not cancel the connection the others wait for.
        return await asyncio.shield(self._connecting)

    def _connected(self, connecting: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if connecting.cancelled() or connecting.exception() is not None:
            return
        connection = connecting.result()
        if self._closed:  # closed after the connect's own check: nothing may outlive aclose()
            connection.fail(ConnectionError("the Redis client is closed"))
        else:
            self._open.append(connection)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):  # once per connection, not per command
                _, connection = await loop.create_connection(_Connection, self._host, self._port)
        except TimeoutError:
            raise TimeoutError(
                f"Redis at {self._host}:{self._port} did not accept within {self._timeout_s:g} s"
            ) from None
        try:
            for command in self._setup:
                reply = await self._exchange(connection, command)
                if isinstance(reply, _ErrorReply):
                    raise ResponseError(str(reply))
        except BaseException:
            connection.fail(ConnectionError("the connection's setup failed"))
            raise
        if self._closed:
            connection.fail(ConnectionError("the Redis client is closed"))
            raise ConnectionError("the Redis client is closed")
        return connection

    async def _exchange(self, connection: _Connection, command: bytes) -> Any:
        loop = asyncio.get_running_loop()
        if connection.closed:  # closed since it was picked (a write to it would be dropped, and time out)
            raise ConnectionError("Redis closed the connection")
        future: asyncio.Future[Any] = loop.create_future()
        connection.send(command)
        connection.waiting.append(future)
        timer = loop.call_at(loop.time() + self._timeout_s, self._expire, connection, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, connection: _Connection, future: asyncio.Future[Any]) -> None:
        if not future.done():
            connection.fail(TimeoutError(f"Redis did not answer within {self._timeout_s:g} s"))


class _Script:
    __slots__ = ("_client", "_evalsha", "_source")

    def __init__(self, client: RespScripts, source: str | bytes) -> None:
        self._client = client
        self._source = source.encode() if isinstance(source, str) else source
        sha = hashlib.sha1(self._source).hexdigest().encode()  # noqa: S324 (Redis names scripts so)
        self._evalsha = [b"EVALSHA", sha]

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        parts = [_arg(len(keys)), *(_arg(key) for key in keys), *(_arg(arg) for arg in args)]
        reply = await self._client.call(pack([*self._evalsha, *parts]))
        if isinstance(reply, _ErrorReply) and reply.startswith("NOSCRIPT"):
            reply = await self._client.call(pack([b"EVAL", self._source, *parts]))
        if isinstance(reply, _ErrorReply):
            raise ResponseError(str(reply))
        return reply


def _arg(value: Any) -> bytes:
    # As redis-py encodes them: bytes as they are, str as UTF-8, numbers by their repr.
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(value).__name__}")


def pack(parts: Sequence[bytes]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def parse(data: bytes, at: int) -> tuple[Any, int]:
    """One RESP2 reply from `at`: (value, the offset after it), or (None, -1) while it is incomplete."""
    end = data.find(b"\r\n", at)
    if end < 0:
        return None, -1
    kind = data[at]
    if kind == 58:  # ':' an integer
        return int(data[at + 1 : end]), end + 2
    if kind == 36:  # '$' a bulk string
        size = int(data[at + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(data) < stop + 2:
            return None, -1
        return data[end + 2 : stop], stop + 2
    if kind == 42:  # '*' an array
        count = int(data[at + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[Any] = []
        position = end + 2
        for _ in range(count):
            item, position = parse(data, position)
            if position < 0:
                return None, -1
            items.append(item)
        return items, position
    if kind == 43:  # '+' a status
        return data[at + 1 : end], end + 2
    if kind == 45:  # '-' an error
        return _ErrorReply(data[at + 1 : end].decode(errors="replace")), end + 2
    raise ValueError(f"unknown RESP type {chr(kind)!r}")
