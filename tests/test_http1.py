"""The lean HTTP/1.1 pool of the upstream calls (app/providers/http1.py), read whole or streamed, against
small test servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.providers.http1 import ConnectTimeout, Http1Pool, UpstreamConnectionError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.closed = asyncio.Event()
        self.requests: list[bytes] = []

    async def start(self, handler: Handler) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await handler(reader, writer)
            finally:
                writer.close()
                self.closed.set()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    started = Server()
    yield started
    if hasattr(started, "_server"):
        started._server.close()


def pool(url: str, **kwargs: float) -> Http1Pool:
    return Http1Pool(url, limit=int(kwargs.pop("limit", 10)), connect_timeout=5, read_timeout=kwargs.pop("read", 10))


async def test_keeps_the_connection_alive_and_sends_the_request_as_given(server: Server) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            server.requests.append(head + body)
            answer = b'{"n": %d}' % len(server.requests)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Thing: yes\r\n\r\n" % len(answer) + answer)

    client = pool(await server.start(echo))
    for n in (1, 2, 3):
        answer = await client.post("/chat/completions", {"X-Request-ID": "abc"}, b'{"q": 1}')
        assert (answer.status, answer.body, answer.headers["x-thing"]) == (200, b'{"n": %d}' % n, "yes")
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-Request-ID: abc\r\n" in first and b"\r\nContent-Length: 8\r\n" in first
    assert first.endswith(b'\r\n\r\n{"q": 1}')
    client.close()


async def test_a_chunked_answer_and_connection_close(server: Server) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nRetry-After: 2\r\n\r\n")
        writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client closes

    client = pool(await server.start(chunked))
    answer = await client.post("/chat/completions", {}, b"{}")
    assert (answer.status, answer.body, answer.headers["retry-after"]) == (503, b"hello world", "2")
    await server.closed.wait()  # the client closed it, as the answer asked
    await client.post("/chat/completions", {}, b"{}")
    assert server.connections == 2


async def test_a_connection_lost_mid_answer_fails_and_is_not_reused(server: Server) -> None:
    async def torn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{partial")
        await writer.drain()

    client = pool(await server.start(torn))
    with pytest.raises(UpstreamConnectionError):
        await client.post("/chat/completions", {}, b"{}")
    with pytest.raises(UpstreamConnectionError):
        await client.post("/chat/completions", {}, b"{}")
    assert server.connections == 2


async def test_silence_past_the_read_timeout_fails_and_closes_the_connection(server: Server) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    client = pool(await server.start(silent), read=0.2)
    with pytest.raises(TimeoutError) as caught:
        await client.post("/chat/completions", {}, b"{}")
    assert not isinstance(caught.value, ConnectTimeout)
    await server.closed.wait()


async def test_a_cancelled_call_closes_its_connection_so_the_upstream_stops(server: Server) -> None:
    received = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received.set()
        await reader.read()

    client = pool(await server.start(slow))
    call = asyncio.create_task(client.post("/chat/completions", {}, b"{}"))
    await received.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await server.closed.wait()
    assert client._open == 0


async def test_a_refused_connection_is_an_os_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await pool(f"http://127.0.0.1:{port}/v1").post("/chat/completions", {}, b"{}")


async def test_the_pool_opens_no_more_connections_than_its_limit(server: Server) -> None:
    gate = asyncio.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    client = pool(await server.start(gated), limit=2)
    calls = [asyncio.create_task(client.post("/chat/completions", {}, b"{}")) for _ in range(6)]
    while server.connections < 2:
        await asyncio.sleep(0.01)
    gate.set()
    answers = await asyncio.gather(*calls)
    assert [a.status for a in answers] == [200] * 6
    assert server.connections == 2


async def test_a_body_without_length_ends_with_the_connection(server: Server) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"whole": true}')
        await writer.drain()

    client = pool(await server.start(until_close))
    answer = await client.post("/chat/completions", {}, b"{}")
    assert (answer.status, answer.body) == (200, b'{"whole": true}')
    assert client._open == 0  # not kept: it is closed


CHUNKED_SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_a_streamed_body_comes_as_it_is_sent_and_the_connection_is_reused(server: Server) -> None:
    step = asyncio.Event()

    async def events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(CHUNKED_SSE + chunk(b"data: 1\n\n"))
            await writer.drain()
            await step.wait()  # the second event only once the client read the first
            step.clear()
            writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        await reader.read()

    client = pool(await server.start(events))
    for _ in range(2):
        stream = await client.stream("/chat/completions", {}, b"{}")
        assert (stream.status, stream.headers["content-type"]) == (200, "text/event-stream")
        assert await stream.read() == b"data: 1\n\n"
        step.set()
        assert await stream.read() == b"data: 2\n\n"
        assert await stream.read() == b""
        stream.close()
    assert server.connections == 1  # read to its end, the connection went back to the pool
    assert client._open == 1
    client.close()


async def test_the_bytes_before_a_dropped_connection_are_read_before_the_failure(server: Server) -> None:
    async def torn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_SSE + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"))
        await writer.drain()

    client = pool(await server.start(torn))
    stream = await client.stream("/chat/completions", {}, b"{}")
    await server.closed.wait()
    await asyncio.sleep(0.05)  # the close has reached the client too
    assert await stream.read() == b"data: 1\n\ndata: 2\n\n"
    with pytest.raises(UpstreamConnectionError):
        await stream.read()
    stream.close()
    assert client._open == 0


async def test_a_stream_closed_before_its_end_closes_its_connection_so_the_upstream_stops(server: Server) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_SSE)
        with contextlib.suppress(ConnectionError):
            for n in range(1000):
                writer.write(chunk(b"data: %d\n\n" % n))
                await writer.drain()
                await asyncio.sleep(0.01)

    client = pool(await server.start(endless))
    stream = await client.stream("/chat/completions", {}, b"{}")
    assert (await stream.read()).startswith(b"data: 0\n\n")
    stream.close()
    stream.close()  # idempotent
    await asyncio.wait_for(server.closed.wait(), 5)
    assert client._open == 0


async def test_a_slow_reader_pauses_the_socket_and_its_own_slowness_is_no_timeout(server: Server) -> None:
    """1 MB sent at once to a reader that waits past the read timeout: nothing is lost, nothing times out."""
    sent = b"".join(chunk(b"data: %06d %s\n\n" % (n, b"x" * 1000)) for n in range(1000))

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_SSE + sent + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    client = pool(await server.start(flood), read=0.2)
    stream = await client.stream("/chat/completions", {}, b"{}")
    await asyncio.sleep(0.5)
    connection = stream._connection
    # Paused past 64 KB: what waits in the process is that and one socket read (at most 256 KB); the
    # kernel holds the rest.
    assert connection._paused and connection._buffered <= (64 + 256) * 1024 < len(sent)
    body = await stream.read_all()
    assert body.count(b"data: ") == 1000 and body.endswith(b"data: 000999 " + b"x" * 1000 + b"\n\n")
    stream.close()
    assert client._open == 1  # read to its end: kept


async def test_silence_in_a_stream_fails_after_the_bytes_before_it(server: Server) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_SSE + chunk(b"data: 1\n\n"))
        await writer.drain()
        await reader.read()

    client = pool(await server.start(stalls), read=0.2)
    stream = await client.stream("/chat/completions", {}, b"{}")
    assert await stream.read() == b"data: 1\n\n"
    with pytest.raises(TimeoutError):
        await stream.read()
    stream.close()
    await asyncio.wait_for(server.closed.wait(), 5)
    assert client._open == 0


async def test_an_error_answer_to_a_stream_is_read_whole(server: Server) -> None:
    async def refuses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 429 Too Many\r\nContent-Length: 11\r\nRetry-After: 3\r\n\r\n{"e": "no"}')
        await reader.read()

    client = pool(await server.start(refuses))
    stream = await client.stream("/chat/completions", {}, b"{}")
    assert (stream.status, stream.headers["retry-after"], await stream.read_all()) == (429, "3", b'{"e": "no"}')
    stream.close()
    assert client._open == 1
    client.close()


@pytest.mark.parametrize("split", [False, True], ids=["one read", "two reads"])
async def test_an_interim_1xx_answer_is_skipped_for_the_answer_that_follows(server: Server, split: bool) -> None:
    """100 Continue or 103 Early Hints first: the answer is the one after it, and the next request on the
    connection gets its own (once, the next caller got the previous one's)."""

    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in (1, 2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
            if split:
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(CHUNKED_SSE + chunk(b"data: %d\n\n" % n) + b"0\r\n\r\n")
            await writer.drain()
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Slow\r\nRetry-After: 5\r\nContent-Length: 2\r\n\r\n{}"
            )
        await reader.read()

    client = pool(await server.start(hints))
    for n in (1, 2):
        stream = await client.stream("/chat/completions", {}, b"{}")
        assert (stream.status, stream.headers) == (
            200,
            {"content-type": "text/event-stream", "transfer-encoding": "chunked"},
        )
        assert await stream.read_all() == b"data: %d\n\n" % n
        stream.close()
        answer = await client.post("/chat/completions", {}, b"{}")
        assert (answer.status, answer.headers["retry-after"], answer.body) == (429, "5", b"{}")
    assert server.connections == 1
    client.close()


async def test_bytes_after_the_end_of_an_answer_are_not_delivered_and_close_the_connection(server: Server) -> None:
    async def stray(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        rest = b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 5\r\n\r\nEVIL!"
        writer.write(CHUNKED_SSE + chunk(b"data: 1\n\n") + b"0\r\n\r\n" + rest)
        await writer.drain()
        await reader.read()

    client = pool(await server.start(stray))
    stream = await client.stream("/chat/completions", {}, b"{}")
    assert await stream.read_all() == b"data: 1\n\n"
    assert "x-injected" not in stream.headers
    stream.close()
    assert client._open == 0  # not reused: it carried what nobody asked for
    await asyncio.wait_for(server.closed.wait(), 5)


async def test_trailers_are_not_the_answers_headers(server: Server) -> None:
    async def trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 429 Slow\r\nRetry-After: 2\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"{}"))
        writer.write(b"0\r\nRetry-After: 86400\r\n\r\n")
        await reader.read()

    client = pool(await server.start(trailer))
    stream = await client.stream("/chat/completions", {}, b"{}")
    assert (await stream.read_all(), stream.headers["retry-after"]) == (b"{}", "2")
    stream.close()
    client.close()


async def test_a_protocol_switch_nobody_asked_for_fails_the_call_and_closes(server: Server) -> None:
    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n")
        await reader.read()

    client = pool(await server.start(upgrade))
    with pytest.raises(UpstreamConnectionError):
        await client.stream("/chat/completions", {}, b"{}")
    assert client._open == 0
    await asyncio.wait_for(server.closed.wait(), 5)


async def test_a_body_in_another_transfer_coding_ends_with_the_connection(server: Server) -> None:
    async def identity(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\ndata: 1\n\n")
        await writer.drain()

    client = pool(await server.start(identity))
    stream = await client.stream("/chat/completions", {}, b"{}")
    assert await stream.read_all() == b"data: 1\n\n"
    stream.close()
    assert client._open == 0
