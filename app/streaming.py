"""A Server-Sent Events response that notices a client leaving at once and keeps idle streams alive.

Starlette's StreamingResponse only learns of a disconnect on its next write; an agent waiting on a
slow upstream would keep generating (and paying) for nobody. Here a watcher cancels the producer
as soon as the client goes, which closes the upstream connection, and a comment line is sent when
nothing else has been for `ping_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from prometheus_client import Gauge
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PING = b": ping\n\n"
_END = object()

EVENT_STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-like proxies not to buffer the stream
}


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        *,
        ping_seconds: float,
        active: Gauge | None = None,
        headers: dict[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        direct: bool = False,
    ) -> None:
        self.frames = frames
        # Frames that already come a read's worth at a time (a relay): each is sent as it comes, by the
        # task that makes it, without a producer task and a queue between them (a hand-off per frame).
        self.direct = direct
        # Runs however the response ends, even if the frames never started (a client gone before
        # the headers were out): what the request holds (a concurrency slot, an upstream call).
        self.on_close = on_close
        self.ping_seconds = ping_seconds
        self.active = active
        self.status_code = 200
        self.background = None
        self.init_headers({**EVENT_STREAM_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.active is not None:
            self.active.inc()
        # The stream is written by this task; the watcher, when the client leaves, cancels it where it
        # waits (for the upstream, say), and the cleanup (closing the upstream call) runs here before
        # we return. One task per stream, not a writer task and asyncio.wait besides.
        task = asyncio.current_task()
        assert task is not None
        state = {"writing": True, "left": False}

        def client_left(watcher: asyncio.Task[None]) -> None:
            if state["writing"] and not watcher.cancelled():
                state["left"] = True
                task.cancel()

        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        watcher.add_done_callback(client_left)
        try:
            try:
                await (self._write_direct(send) if self.direct else self._write(send))
            except asyncio.CancelledError:
                if not state["left"] or task.uncancel() > 0:
                    raise  # a cancellation not the watcher's
            finally:
                state["writing"] = False
        finally:
            watcher.remove_done_callback(client_left)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await watcher
            if self.on_close is not None:
                await self.on_close()
            if self.active is not None:
                self.active.dec()

    async def _write(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        queue: asyncio.Queue[bytes | object] = asyncio.Queue(maxsize=64)
        producer = asyncio.create_task(_produce(self.frames, queue))
        # One timer for the pings, not a timeout around every wait for a frame (that was a timer
        # armed and cancelled per write).
        pinger = _Pinger(queue, self.ping_seconds)
        try:
            ended = False
            while not ended:
                frame = await queue.get()
                # Whatever else is already waiting goes out in the same write: one ASGI message
                # (and one pass through every middleware's send) for a burst of tokens.
                batch: list[bytes] = []
                while frame is not _END:
                    assert isinstance(frame, bytes)
                    batch.append(frame)
                    if queue.empty():
                        break
                    frame = queue.get_nowait()
                ended = frame is _END
                if batch:
                    pinger.sent()
                    body = batch[0] if len(batch) == 1 else b"".join(batch)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            producer.result()  # surface a producer failure, if any
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            pinger.stop()
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _write_direct(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pinger = _DirectPinger(send, self.ping_seconds)
        frames = self.frames
        try:
            async for frame in frames:
                if pinger.task is not None:  # never two sends at once
                    await pinger.task
                pinger.busy = True
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                pinger.sent()
            if pinger.task is not None:
                await pinger.task
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            pinger.stop()
            await frames.aclose()


class _DirectPinger:
    """For a direct writer: sends a ping (in a task of its own) when nothing was sent for `seconds`."""

    __slots__ = ("_handle", "_last", "_loop", "_seconds", "_send", "busy", "task")

    def __init__(self, send: Send, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._send = send
        self._seconds = seconds
        self._last = self._loop.time()
        self.busy = False  # a frame is being sent
        self.task: asyncio.Task[None] | None = None  # a ping being sent
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(self._last + seconds, self._fire)

    def sent(self) -> None:
        self.busy = False
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.task is not None:
            self.task.cancel()

    def _fire(self) -> None:
        now = self._loop.time()
        due = self._last + self._seconds
        if now >= due:
            if not self.busy and self.task is None:
                self.task = self._loop.create_task(self._ping())
            self._last = now
            due = now + self._seconds
        self._handle = self._loop.call_at(due, self._fire)

    async def _ping(self) -> None:
        try:
            with contextlib.suppress(OSError):  # a client gone: the disconnect watcher ends the stream
                await self._send({"type": "http.response.body", "body": PING, "more_body": True})
        finally:
            self.task = None


class _Pinger:
    """Queues a ping when nothing was sent for `seconds` (checked by one timer, re-armed as it fires)."""

    __slots__ = ("_handle", "_last", "_loop", "_queue", "_seconds")

    def __init__(self, queue: asyncio.Queue[bytes | object], seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue
        self._seconds = seconds
        self._last = self._loop.time()
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(self._last + seconds, self._fire)

    def sent(self) -> None:
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        now = self._loop.time()
        due = self._last + self._seconds
        if now >= due:
            if self._queue.empty():  # frames waiting are about to be sent: no ping needed
                self._queue.put_nowait(PING)
            self._last = now  # the ping is as good as sent: the next one after another quiet interval
            due = now + self._seconds
        self._handle = self._loop.call_at(due, self._fire)


async def _produce(frames: AsyncGenerator[bytes, None], queue: asyncio.Queue[bytes | object]) -> None:
    failure: Exception | None = None
    try:
        async for frame in frames:
            await queue.put(frame)
    except Exception as exc:  # the writer re-raises it once the frames before it are sent
        failure = exc
    finally:
        await frames.aclose()
    await queue.put(_END)
    if failure is not None:
        raise failure


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
