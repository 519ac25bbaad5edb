"""The hottest routes as one pure-ASGI function: POST /v1/chat/completions and POST /v1/tasks without the
framework's layers.

Everything else goes through the whole stack (app/main.py): FastAPI's entry (its native telemetry)
and error middlewares, our six middlewares, the router and its dependency solving. For these routes
that stack was more than a third of the server's CPU per request (py-spy, chat JSON at concurrency
64), and on a streamed task every event passed six `send` wrappers (14 % of its CPU with 9,000 streams
held), against work of its own that is the same every time. So this app, outermost, does what those
layers do for these routes, in one frame and one `send` wrapper, with the same objects and functions
they use:

- the request id (the client's when well-formed), the traffic counters (RequestContextMiddleware);
- the per-address edge limits, and their refusals (app/edge/middleware.py, the same function);
- the audit context, its row submitted before the last byte or when the request ends without one
  (AuditMiddleware), with the route's template;
- the body limit, by Content-Length (413 problem+json before anything else) or while the body comes
  in (the route's own 413) (BodyLimitMiddleware);
- the HTTP metrics by route template and status class (HttpMetricsMiddleware);
- the route's errors as its handler renders them (OpenAI's envelope on the chat route, problem+json on
  the tasks route), and anything unexpected logged and answered 500 problem+json, then raised to the
  server, as Starlette's ServerErrorMiddleware does.

Each route's own work is the very handler FastAPI calls (`chat_completions`, `create_task`), so auth,
limits, budgets, breakers and fallback, idempotency, drain and load shedding (the enforcer's), usage
and the cost header are the same code. The routes stay registered with FastAPI, which documents them
in the OpenAPI schema. Requests this path does not take go to the whole stack, unchanged: other
routes and methods, a request with an Origin while CORS is on, and every request while tracing is
on (the request span is the request-id middleware's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.routing import APIRoute
from prometheus_client.metrics import Counter, Histogram
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.audit.context import AuditContext, audit_var
from app.audit.middleware import transport_for
from app.edge.middleware import refused
from app.middleware import (
    REQUEST_ID_HEADER,
    RESPONSE_HEADERS_KEY,
    TrafficCounters,
    _BodyTooLarge,
    _drain,
    _request_id,
    _send_too_large,
    limited_receive,
    request_id_var,
    response_headers,
)
from app.observability import tracing
from app.observability.metrics import Metrics
from app.problems import Handler, unexpected_error_response
from app.resources import Resources

_STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


@dataclass(slots=True)
class FastRoute:
    """A POST route this path serves: FastAPI's route object (its template names the audit row and the
    metrics; scope["route"] and scope["endpoint"] are set from it) and its handler, which does the
    route's work and renders its errors as the route's own error handling does."""

    route: APIRoute
    handler: Handler
    transport: str = ""  # the audit row's until the route names its own (transport_for)
    # The route's series, looked up once rather than by labels on every request.
    seconds: Histogram | None = None
    by_class: dict[int, Counter] = field(default_factory=dict)


class FastPath:
    """Takes its routes' POSTs before `app` (the whole stack) would, when nothing calls for the stack."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        owner: ASGIApp,
        routes: list[FastRoute],
        metrics: Metrics,
        counters: TrafficCounters,
        max_body_bytes: int,
        cors_on: bool,
    ) -> None:
        self.app = app
        self.owner = owner  # the application, scope["app"] as Starlette sets it
        self.routes = {entry.route.path: entry for entry in routes}
        for entry in routes:
            entry.transport = transport_for(entry.route.path)
            entry.seconds = metrics.http_seconds.labels("POST", entry.route.path)
        self.counters = counters
        self.max_body_bytes = max_body_bytes
        self.cors_on = cors_on
        self._requests = metrics.http_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entry = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if entry is None or scope["method"] != "POST" or scope.get("root_path") or tracing.TRACER is not None:
            await self.app(scope, receive, send)
            return
        content_length: bytes | None = None
        user_agent: bytes | None = None
        authorization: bytes | None = None
        x_api_key: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"origin":
                if self.cors_on:
                    await self.app(scope, receive, send)
                    return
            elif name == b"content-length":
                if content_length is None:  # the first, as the body limit reads it
                    content_length = value
            elif name == b"user-agent":
                if user_agent is None:
                    user_agent = value
            elif name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"x-api-key" and x_api_key is None:
                x_api_key = value
        state: dict[str, Any] = scope.setdefault("state", {})
        resources: Resources | None = state.get("resources")
        if resources is None:  # no lifespan ran: nothing here to serve it with
            await self.app(scope, receive, send)
            return
        await self._serve(
            entry, scope, receive, send, state, resources, content_length, user_agent, (authorization, x_api_key)
        )

    async def _serve(
        self,
        entry: FastRoute,
        scope: Scope,
        receive: Receive,
        send: Send,
        state: dict[str, Any],
        resources: Resources,
        content_length: bytes | None,
        user_agent: bytes | None,
        key_headers: tuple[bytes | None, bytes | None],
    ) -> None:
        # RequestContextMiddleware
        request_id = _request_id(scope)
        state["request_id"] = request_id
        id_token = request_id_var.set(request_id)
        id_header = (REQUEST_ID_HEADER, request_id.encode())
        counters = self.counters
        counters.active_requests += 1
        counters.total_requests += 1
        started = False
        context: AuditContext | None = None  # from the audit middleware's place on
        submitted = False
        status = 500

        def submit() -> None:
            nonlocal submitted
            if submitted or context is None:
                return
            submitted = True
            template = getattr(scope.get("route"), "path", None)
            if template:
                context.route = template  # the template, as the router matched it
            if sink is not None and not context.owned_by_task:
                sink.submit(context.row())

        async def send_fused(message: Message) -> None:
            nonlocal started, status
            kind = message["type"]
            if kind == "http.response.start":
                started = True
                status = message["status"]
                if context is not None:
                    context.http_status = status
                # Headers decided along the way (rate-limit state, cost) reach every kind of response.
                decided = state.pop(RESPONSE_HEADERS_KEY, ())
                message["headers"] = response_headers(message.get("headers", ()), id_header, decided)
            elif kind == "http.response.body" and not message.get("more_body", False):
                # Journaled before the last byte goes out: a crash after the client has its
                # whole answer cannot lose the row.
                submit()
            await send(message)

        sink = resources.audit
        audit_token = None
        try:
            # EdgeMiddleware (CorsMiddleware let it through: no Origin, or CORS off)
            if await refused(scope, receive, send_fused, resources, key_headers):
                return
            # AuditMiddleware
            client = scope.get("client")
            route = entry.route
            context = AuditContext(
                request_id=request_id,
                route=route.path,
                transport=entry.transport,
                client_ip=client[0] if client else None,
                user_agent=user_agent.decode("latin-1") if user_agent is not None else None,
            )
            state["audit"] = context
            audit_token = audit_var.set(context)
            # BodyLimitMiddleware
            limit = self.max_body_bytes
            if content_length is not None and content_length.isdigit() and int(content_length) > limit:
                await _drain(receive, int(content_length))
                await _send_too_large(send_fused, limit)
                return
            counting_receive = limited_receive(receive, limit)

            # HttpMetricsMiddleware, then the router's match and the route
            began = time.perf_counter()
            scope["app"] = self.owner
            scope["route"] = route
            scope["endpoint"] = route.endpoint
            scope["path_params"] = {}
            try:
                response = await entry.handler(_Request(scope, counting_receive))
                await response(scope, counting_receive, send_fused)
            except _BodyTooLarge:
                if started:
                    raise
                await _send_too_large(send_fused, limit)
            finally:
                self._observe(entry, status, time.perf_counter() - began)
        except Exception as exc:
            if context is not None and context.http_status is None:
                context.http_status = 500
            # ServerErrorMiddleware: a 500 if nothing was sent yet, then raised for the server to log.
            if not started:
                response = unexpected_error_response("POST", scope["path"], exc)
                await response(scope, receive, send)
            raise
        except BaseException:
            if context is not None and context.http_status is None:
                context.http_status = 500
            raise
        finally:
            if audit_token is not None:
                audit_var.reset(audit_token)
            submit()  # no complete response (a client gone, a failure): the row goes now
            counters.active_requests -= 1
            request_id_var.reset(id_token)

    def _observe(self, entry: FastRoute, status: int, seconds: float) -> None:
        counter = entry.by_class.get(status // 100)
        if counter is None:
            status_class = _STATUS_CLASSES.get(status // 100, "5xx")
            counter = entry.by_class[status // 100] = self._requests.labels("POST", entry.route.path, status_class)
        counter.inc()
        assert entry.seconds is not None
        entry.seconds.observe(seconds)


class _Headers(Headers):
    """Starlette's Headers, whose get() found a header by a scan and a missing one by a KeyError raised and
    caught: here a dict of the first value of each name, made once (the route asks for four)."""

    _first: dict[bytes, bytes] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        first = self._first
        if first is None:
            first = self._first = {name: value for name, value in reversed(self._list)}
        value = first.get(key.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")


class _Request(Request):
    """Starlette's Request, its body read by a plain loop (its stream() is an async generator, which the
    event loop registers and forgets for every request), its headers a _Headers."""

    @property
    def headers(self) -> Headers:
        if not hasattr(self, "_headers"):
            self._headers = _Headers(scope=self.scope)
        return self._headers

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            if self._stream_consumed:
                raise RuntimeError("Stream consumed")
            chunks: list[bytes] = []
            while not self._stream_consumed:
                message = await self._receive()
                if message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        self._stream_consumed = True
                elif message["type"] == "http.disconnect":
                    self._is_disconnected = True
                    raise ClientDisconnect()
            self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body
