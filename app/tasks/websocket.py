"""WS /v1/ws: several tasks over one socket, their events interleaved and tagged by task id.

Client messages: {"type": "task.create", "ref"?, ...task fields}, {"type": "task.cancel", "task_id"},
{"type": "subscribe", "task_id", "after"?} (replay and follow a background task, started anywhere)
and {"type": "unsubscribe", "task_id"}; admin keys may also {"type": "subscribe", "topic": "activity"}
(the dashboard's feed, app/observability/activity_feed.py). A bad message gets {"type": "error", "code", "detail"} and
the socket stays open; a key revoked while the socket is open closes it with 4401 (after an error
message). A background task created here goes on when the socket closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from app.agent.runner import Event
from app.agent.schemas import TaskCreate
from app.audit.context import AuditContext
from app.auth.authenticator import key_from_headers
from app.auth.principal import Principal
from app.cors import websocket_origin_refusal
from app.dependencies import ResourcesDep
from app.drain import new_work_refused
from app.errors import AppError, MalformedJSON, TooManyTasks, Unauthenticated
from app.middleware import request_id_var
from app.observability.activity_feed import SNAPSHOT_DUE, ActivitySubscription
from app.problems import problem_response
from app.request_body import parse_json, validate
from app.resources import Resources
from app.tasks.events import LoggedEvent
from app.tasks.service import AdmittedTask

log = logging.getLogger(__name__)
router = APIRouter(tags=["tasks"])

_OUTBOX_SIZE = 256
BEARER_SUBPROTOCOL = "pacemaker.bearer"
# Close code for a key that stopped being valid while its socket was open (4000-4999: the application's).
CLOSE_KEY_REVOKED = 4401
_CLOSE = b""  # queued after the last message of a socket being closed (never a message of its own)
_RESTART = b"\x00"  # the same, when the instance shuts down: close 1012 (service restart)
CLOSE_RESTARTING = 1012


@router.websocket("/v1/ws")
async def task_socket(websocket: WebSocket, resources: ResourcesDep) -> None:
    # Any page may open a socket anywhere: the Origin is checked before the key (CORS's check, for sockets).
    refusal = websocket_origin_refusal(resources.settings.server.cors, websocket.headers)
    if refusal is None and resources.drain.draining:
        refusal = new_work_refused()
    if refusal is not None:
        await _refuse(websocket, resources, refusal, None)
        return
    presented, subprotocol = presented_key(websocket)
    try:
        principal = await resources.authenticator.authenticate(
            presented, client=websocket.client.host if websocket.client else None
        )
    except AppError as exc:
        await _refuse(websocket, resources, exc, None)
        return
    try:
        slot = resources.websockets.open(principal.key_id, resources.settings.server.ws_max_per_key)
    except AppError as exc:
        await _refuse(websocket, resources, exc, principal.key_id)
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
        socket = TaskSocket(websocket, resources, principal, presented)
        resources.drain.sockets.add(socket)  # closed 1012 after its tasks' final events, at shutdown
        try:
            await socket.serve()
        finally:
            resources.drain.sockets.discard(socket)
    finally:
        slot.release()


def presented_key(websocket: WebSocket) -> tuple[str | None, str | None]:
    """The key a socket presents, and the subprotocol to echo.

    Headers first; then the Sec-WebSocket-Protocol pair `pacemaker.bearer, <key>`, which browsers
    can send (they cannot set headers) without putting the key in the URL, where proxies and access
    logs keep it; only `pacemaker.bearer` is echoed back, never the key. `?api_key=` stays for
    older clients.
    """
    headers = websocket.headers
    key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    offered = [part.strip() for part in headers.get("sec-websocket-protocol", "").split(",") if part.strip()]
    subprotocol = BEARER_SUBPROTOCOL if BEARER_SUBPROTOCOL in offered else None
    if key is None and subprotocol is not None:
        position = offered.index(BEARER_SUBPROTOCOL)
        key = offered[position + 1] if position + 1 < len(offered) else None
    return key or websocket.query_params.get("api_key"), subprotocol


async def _refuse(websocket: WebSocket, resources: Resources, error: AppError, key_id: int | None) -> None:
    """Refuse the handshake with a problem+json answer, and audit the refusal."""
    refused = _audit_context(websocket, request_id_var.get() or "")
    refused.api_key_id = key_id
    resources.tasks.refused(refused, error)
    await websocket.send_denial_response(problem_response(error))


def _audit_context(websocket: WebSocket, request_id: str) -> AuditContext:
    client = websocket.client
    return AuditContext(
        request_id=request_id,
        route="/v1/ws",
        transport="ws",
        client_ip=client.host if client else None,
        user_agent=websocket.headers.get("user-agent"),
    )


class TaskSocket:
    def __init__(self, websocket: WebSocket, resources: Resources, principal: Principal, presented: str | None) -> None:
        self.websocket = websocket
        self.resources = resources
        self.principal = principal
        self._presented = presented  # checked again on every task.create and every key_cache_seconds
        self._revoked = False
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_OUTBOX_SIZE)
        self.tasks: dict[str, AdmittedTask] = {}  # running on this socket, by id
        self._running: set[asyncio.Task[None]] = set()  # what renders them, and the subscriptions
        self._subscriptions: dict[str, asyncio.Task[None]] = {}  # background tasks followed, by id
        self._activity: ActivitySubscription | None = None  # the activity feed, when subscribed
        # Each task.create is a request of its own in the audit log: <socket's request id>:<n>.
        self._socket_request_id = request_id_var.get() or ""
        self._creates = 0

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._write())
        watcher = asyncio.create_task(self._watch_key())
        try:
            # The socket is done when the client leaves (reader) or can no longer be written to
            # (writer, which also closes it once its key is revoked).
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            running = list(self._running)
            for task in (*running, reader, writer, watcher):
                task.cancel()
            await asyncio.gather(*running, reader, writer, watcher, return_exceptions=True)
            if self._activity is not None:
                self.resources.activity.unsubscribe(self._activity)

    async def restart(self) -> None:
        """Close with 1012 once what is queued (the tasks' final events) has gone out."""
        await self.outbox.put(_RESTART)

    async def _watch_key(self) -> None:
        """Close the socket once its key is revoked, even if it never creates another task."""
        period = max(1.0, self.resources.settings.auth.key_cache_seconds)
        while True:
            await asyncio.sleep(period)
            if not await self._key_still_valid():
                return

    async def _key_still_valid(self) -> bool:
        """Authenticate the socket's key again (through the cache); a revoked key closes it with 4401."""
        if self._revoked:
            return False
        try:
            self.principal = await self.resources.authenticator.authenticate(self._presented)
        except Unauthenticated as exc:
            self._revoked = True
            # The writer sends the error, then the close frame; the tasks still running end with the socket.
            await self._error(exc.code, "The API key of this socket was revoked.")
            await self.outbox.put(_CLOSE)
            return False
        except AppError:
            return True  # the key store is unavailable: keep serving on what the socket was granted
        return True

    async def _read(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            await self._handle(raw)

    async def _write(self) -> None:
        while True:
            data = await self.outbox.get()
            if data is SNAPSHOT_DUE:  # the feed's newest snapshot, taken now: a slow client skips old ones
                taken = self._activity.take_snapshot() if self._activity is not None else None
                if taken is None:
                    continue
                data = taken
            try:
                if data == _CLOSE:
                    await self.websocket.close(CLOSE_KEY_REVOKED, "API key revoked")
                    return
                if data == _RESTART:
                    await self.websocket.close(CLOSE_RESTARTING, "server restarting; reconnect")
                    return
                await self.websocket.send_text(data.decode())
            except (WebSocketDisconnect, OSError, RuntimeError):
                return  # the client is gone; the reader will see it, or serve() ends us both

    async def _handle(self, raw: str | bytes) -> None:
        try:
            message = parse_json(raw, self.resources.settings.server.max_json_depth)
        except MalformedJSON:
            await self._error("invalid_message", "Messages must be JSON objects.")
            return
        except AppError as exc:  # nested too deep
            await self._error(exc.code, exc.detail)
            return
        if not isinstance(message, dict):
            await self._error("invalid_message", "Messages must be JSON objects.")
            return
        kind = message.pop("type", None)
        ref = message.pop("ref", None)
        if self._revoked:
            return  # closing: the writer sends the close frame after what is queued
        if kind == "task.create":
            if await self._key_still_valid():
                await self._create(message, ref)
        elif kind == "task.cancel":
            await self._cancel(message.get("task_id"), ref)
        elif kind in ("subscribe", "unsubscribe") and "topic" in message:
            await self._topic(kind, message["topic"], ref)
        elif kind == "subscribe":
            await self._subscribe(message.get("task_id"), message.get("after", 0), ref)
        elif kind == "unsubscribe":
            await self._unsubscribe(message.get("task_id"), ref)
        else:
            known = "task.create, task.cancel, subscribe or unsubscribe"
            await self._error("invalid_message", f"Unknown message type {kind!r}; use {known}.", ref)

    async def _create(self, fields: dict[str, Any], ref: Any) -> None:
        fields.pop("stream", None)  # every task on a socket streams
        self._creates += 1
        audit = _audit_context(self.websocket, f"{self._socket_request_id}:{self._creates}")
        audit.api_key_id = self.principal.key_id
        service = self.resources.tasks
        try:
            body = validate(TaskCreate, fields)
            if len(self.tasks) >= self.resources.settings.server.ws_max_tasks_per_socket:
                raise TooManyTasks(f"At most {len(self.tasks)} tasks may run at once on one socket.")
            task = await service.admit(self.principal, body, transport="ws", audit=audit, stream=True)
        except AppError as exc:
            service.refused(audit, exc)
            await self._error(exc.code, exc.detail, ref, retry_after=exc.retry_after)
            return
        except Exception:
            # A bug of ours must not end the socket (and its running tasks) without a word.
            log.exception("task.create failed unexpectedly")
            service.refused(audit, AppError("The task could not be created."))
            await self._error("internal_error", "The task could not be created; the request id is in the logs.", ref)
            return
        if body.background:
            # It runs on when this socket closes; the socket follows it like any subscriber.
            await self.resources.background.start(task)
            self._follow(task.id, await self.resources.background.follow(task.id, 0), ref)
            return
        self.tasks[task.id] = task
        self._render(self._run(task, ref))

    def _render(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        renderer = asyncio.create_task(work)
        self._running.add(renderer)
        renderer.add_done_callback(self._running.discard)
        return renderer

    def _follow(self, task_id: str, events: AsyncIterator[LoggedEvent], ref: Any) -> None:
        self._subscriptions[task_id] = self._render(self._send_logged(task_id, events, ref))

    async def _send_logged(self, task_id: str, events: AsyncIterator[LoggedEvent], ref: Any) -> None:
        try:
            async for event in events:
                if ref is None:
                    await self.outbox.put(event.data)  # sent as logged, never encoded again
                else:
                    await self.outbox.put(orjson.dumps({**orjson.loads(event.data), "ref": ref}))
        except AppError as exc:  # its events were dropped meanwhile (EventsGone)
            await self._error(exc.code, exc.detail, ref)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
            if self._subscriptions.get(task_id) is asyncio.current_task():
                del self._subscriptions[task_id]

    async def _subscribe(self, task_id: Any, after: Any, ref: Any) -> None:
        """Replay and follow a background task's events on this socket (one started anywhere)."""
        if not isinstance(task_id, str) or not task_id:
            await self._error("invalid_request", "subscribe needs a task_id.", ref)
            return
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            await self._error("invalid_resume_point", "after must be a non-negative integer (an event's seq).", ref)
            return
        if task_id in self._subscriptions:
            await self._error("already_subscribed", f"This socket already follows {task_id}.", ref)
            return
        try:
            events = await self.resources.background.follow_for(self.principal, task_id, after)
        except AppError as exc:
            await self._error(exc.code, exc.detail, ref)
            return
        self._follow(task_id, events, ref)

    async def _topic(self, kind: str, topic: Any, ref: Any) -> None:
        """Subscribe to (or leave) the activity feed: admin keys only, as it shows every key's tasks."""
        if topic != "activity":
            await self._error("invalid_request", f"Unknown topic {topic!r}; the one topic is 'activity'.", ref)
        elif kind == "unsubscribe":
            if self._activity is None:
                await self._error("not_found", "This socket does not follow the activity feed.", ref)
                return
            self.resources.activity.unsubscribe(self._activity)
            self._activity = None
        elif not self.principal.is_admin:
            await self._error("forbidden", "The activity feed is for admin keys.", ref)
        elif self._activity is not None:
            await self._error("already_subscribed", "This socket already follows the activity feed.", ref)
        else:
            self._activity = self.resources.activity.subscribe(self.outbox, lambda: self.principal.is_admin)

    async def _unsubscribe(self, task_id: Any, ref: Any) -> None:
        follower = self._subscriptions.pop(task_id, None) if isinstance(task_id, str) else None
        if follower is None:
            await self._error("not_found", f"This socket does not follow {task_id!r}.", ref)
            return
        follower.cancel()

    async def _run(self, task: AdmittedTask, ref: Any) -> None:
        gauge = self.resources.metrics.active_streams.labels("ws")
        gauge.inc()
        try:
            async with aclosing(self.resources.tasks.run(task)) as events:
                async for event in events:
                    await self._send_event(event, ref)
        finally:
            gauge.dec()
            self.tasks.pop(task.id, None)
            await self.resources.tasks.close(task)  # if the socket closed before the run began

    async def _cancel(self, task_id: Any, ref: Any) -> None:
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None:
            await self._error("not_found", f"No running task {task_id!r} on this socket.", ref)
            return
        task.spec.control.cancel()  # its last event, task.failed (cancelled), still comes on this socket

    async def _send_event(self, event: Event, ref: Any) -> None:
        payload = event.model_dump(mode="json")
        if ref is not None:
            payload["ref"] = ref
        await self.outbox.put(orjson.dumps(payload))

    async def _error(self, code: str, detail: str, ref: Any = None, retry_after: float | None = None) -> None:
        payload: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
        if retry_after is not None:
            payload["retry_after"] = retry_after
        if ref is not None:
            payload["ref"] = ref
        await self.outbox.put(orjson.dumps(payload))
