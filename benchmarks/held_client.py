"""The held-stream benchmark's load generator: one process opening SSE streams on a schedule and holding them.

    python -m benchmarks.held_client < spec.json > result.json

benchmarks/held.py starts several of these; each opens its share of the streams (stream i of
`count` at `start_at + i / rate`, this process taking every `procs`-th from `offset`), holds each
to its end, and writes what it saw as JSON on stdout. Raw asyncio on uvloop with httptools' parser
(no client library): one connection per stream, from source addresses spread over 127.0.0.0/8 with
IP_BIND_ADDRESS_NO_PORT, so that the ephemeral port range is shared per destination, not per
source. It raises its own RLIMIT_NOFILE to the hard limit first.

An error is counted by kind: `connect refused`, `connect timeout`, `reset` (the connection lost
before the response ended), `timeout` (the whole stream past `timeout_s`), `HTTP <status>`,
`incomplete` (the response ended without the expected last event), `protocol` and `os <errno>`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import resource
import socket
import sys
import time
from collections import Counter
from typing import Any, cast

import httptools
import uvloop

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux; Python 3.11 lacks the name
CONNECT_TIMEOUT_S = 30.0  # SYN retries into a full accept queue: 1 + 2 + 4 + 8 s, then give up


def raise_fd_limit() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE raised to the hard one; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class _Stream(asyncio.Protocol):
    """One request on its own connection; the times of its first body byte and of its end."""

    def __init__(self, request: bytes, expect: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.expect = expect
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.first_byte: float | None = None
        self.bytes = 0
        self.tail = b""
        self.seen = False
        self.complete = False
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._end("protocol")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        self.bytes += len(body)
        if not self.seen:  # the expected event anywhere in the body, across chunk boundaries
            self.seen = self.expect in self.tail + body
            self.tail = (self.tail + body)[-len(self.expect) :]

    def on_message_complete(self) -> None:
        self.complete = True
        if self.status != 200:
            self._end(f"HTTP {self.status}")
        elif not self.seen:
            self._end("incomplete")
        else:
            self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete:
            self._end("reset")

    def _end(self, error: str | None) -> None:
        if self.done.done():
            return
        self.error = error
        if self.transport is not None:
            self.transport.close()
        self.done.set_result(None)


async def _connect(
    loop: asyncio.AbstractEventLoop, source: str, host: str, port: int, protocol: _Stream
) -> asyncio.Transport:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.sock_connect(sock, (host, port))
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport


def _os_error_kind(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    return f"os {errno.errorcode.get(exc.errno or 0, exc.errno)}"


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port, path = spec["host"], int(spec["port"]), spec["path"]
    body = spec["body"].encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    head += [f"{name}: {value}" for name, value in spec.get("headers", {}).items()]
    head += [f"Content-Length: {len(body)}", "", ""]
    request = "\r\n".join(head).encode() + body
    expect = spec["expect"].encode()
    sources: list[str] = spec["sources"]
    count, rate, procs, offset = int(spec["count"]), float(spec["rate"]), int(spec["procs"]), int(spec["offset"])
    timeout_s = float(spec["timeout_s"])
    start_at = float(spec["start_at"])  # wall clock, shared by every process of the row

    errors: Counter[str] = Counter()
    ttfb: list[float] = []
    totals: list[float] = []
    late: list[float] = []  # how far behind its schedule each stream started (this process's own lag)
    open_now = peak_open = 0

    async def one(index: int) -> None:
        nonlocal open_now, peak_open
        done: asyncio.Future[None] = loop.create_future()
        protocol = _Stream(request, expect, done)
        started = time.perf_counter()
        open_now += 1
        peak_open = max(peak_open, open_now)
        transport: asyncio.Transport | None = None
        try:
            try:
                transport = await _connect(loop, sources[index % len(sources)], host, port, protocol)
            except TimeoutError:
                errors["connect timeout"] += 1
                return
            except OSError as exc:
                errors[_os_error_kind(exc)] += 1
                return
            try:
                async with asyncio.timeout(max(0.0, started + timeout_s - time.perf_counter())):
                    await done
            except TimeoutError:
                errors["timeout"] += 1
                return
            if protocol.error is not None:
                errors[protocol.error] += 1
                return
            assert protocol.first_byte is not None
            ttfb.append(protocol.first_byte - started)
            totals.append(time.perf_counter() - started)
        finally:
            open_now -= 1
            if transport is not None:
                transport.close()

    tasks = []
    begin_wall, begin_perf = time.time(), time.perf_counter()
    base = begin_perf + (start_at - begin_wall)
    for index in range(offset, count, procs):
        due = base + index / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        late.append(max(0.0, time.perf_counter() - due))
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "streams": len(tasks),
        "ok": len(totals),
        "errors": dict(errors),
        "ttfb_s": ttfb,
        "total_s": totals,
        "max_late_s": max(late, default=0.0),
        "peak_open": peak_open,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def main() -> None:
    spec = json.load(sys.stdin)
    soft, _hard = raise_fd_limit()
    share = -(-int(spec["count"]) // int(spec["procs"]))
    if soft < share + 64:
        sys.exit(f"held_client: RLIMIT_NOFILE is {soft}, too few for {share} connections")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
