"""Pure ASGI middleware: request ids and traffic counters, and the request body size limit."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.audit.context import note_error
from app.errors import PayloadTooLarge
from app.ids import new_id
from app.observability import tracing

REQUEST_ID_HEADER = b"x-request-id"
_WELL_FORMED_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Request state entry: a list of (name, value) byte pairs added to the response's headers.
RESPONSE_HEADERS_KEY = "response_headers"


def response_headers(
    own: Iterable[tuple[bytes, bytes]], request_id: tuple[bytes, bytes], decided: Iterable[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """A response's headers: its own, the request id, and those decided along the way (rate-limit
    state, cost) that it does not set itself. A refusal's x-ratelimit-* are fresher than the
    admission's: sent both, a client joining repeated headers read "600, 400"."""
    headers = [*own, request_id]
    names = {name.lower() for name, _ in headers}
    headers.extend(pair for pair in decided if pair[0] not in names)
    return headers


def add_response_headers(scope: Scope, headers: dict[str, str]) -> None:
    """Adds headers to the eventual response of the request (or WebSocket handshake) of `scope`."""
    pairs: list[tuple[bytes, bytes]] = scope.setdefault("state", {}).setdefault(RESPONSE_HEADERS_KEY, [])
    pairs.extend((name.lower().encode(), value.encode()) for name, value in headers.items())


@dataclass(slots=True)
class TrafficCounters:
    started_at: float = field(default_factory=time.monotonic)
    active_requests: int = 0
    total_requests: int = 0


class RequestContextMiddleware:
    """Gives every request an id (the client's, when well-formed) and counts traffic for /health."""

    def __init__(self, app: ASGIApp, counters: TrafficCounters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        header = (REQUEST_ID_HEADER, request_id.encode())

        state = scope["state"]

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                # Headers decided along the way (rate-limit state, cost) reach every kind of response.
                # Popped: a held stream would keep them (about 1 KB) as long as it lasts.
                decided = state.pop(RESPONSE_HEADERS_KEY, ())
                message["headers"] = response_headers(message.get("headers", ()), header, decided)
            await send(message)

        counters = self.counters
        counters.active_requests += 1
        counters.total_requests += 1
        try:
            if tracing.TRACER is None:
                await self.app(scope, receive, send_with_id)
            else:
                await tracing.traced_request(self.app, scope, receive, send_with_id, request_id)
        finally:
            counters.active_requests -= 1
            request_id_var.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _WELL_FORMED_ID.match(value):
                return str(value.decode())
            break
    return new_id()  # as unique as a uuid4, at a fraction of its cost (no syscall each)


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413, by Content-Length or while they stream in."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    await _drain(receive, int(value))
                    await _send_too_large(send, limit)
                    return
                break

        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive(receive, limit), tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await _send_too_large(send, limit)


def limited_receive(receive: Receive, limit: int) -> Receive:
    """`receive`, counting body bytes: past `limit` it reads the rest away and raises _BodyTooLarge."""
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await _drain(receive, received)
                raise _BodyTooLarge
        return message

    return counting_receive


class _BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI re-raises those from body parsing (others become a 400);
    # the app's handler renders it as 413 problem+json.
    def __init__(self) -> None:
        super().__init__(status_code=413)


# Reading (and dropping) the rest of an oversized body lets the client read our 413; closing on
# unread data would reset the connection under it. Past this much, we stop being polite.
MAX_DRAIN_BYTES = 16 * 1024 * 1024


async def _drain(receive: Receive, counted: int) -> None:
    """Read and drop body chunks until the body ends or `counted` passes MAX_DRAIN_BYTES."""
    seen = counted
    while seen <= MAX_DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_too_large(send: Send, limit: int) -> None:
    error = PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    note_error(error.code)
    body = orjson.dumps(error.problem(request_id_var.get()))
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
