"""The edge middleware: counts each request of a client address and refuses one over a limit with 429.

It sits outside the audit middleware and everything after it, so a refusal costs no key lookup, no
routing, no body read and no audit row of its own (app/main.py has the order). The address is the
one uvicorn resolved: X-Forwarded-For is honoured only with `server.proxy_headers` and only from
`server.forwarded_allow_ips` (uvicorn's ProxyHeadersMiddleware rewrote scope["client"] before this
runs); a header sent by anyone else changes nothing.

An address over a limit is still served when its request's key is known good here (the key cache):
such a request costs no lookup, and behind a NAT or an application server one caller's flood then
does not lock out the others whose keys are known; with the counts in Redis such a request is counted
without waiting for the answer (EdgeLimiter.admit_later). Health, metrics, docs and the dashboard's page
and files are never limited (they need no key; the dashboard's data comes over /v1/ws, which is).

Refusals are audited cheaply: the first refusal of each block (an address over a limit, until its
window ends) writes an audit row, pacemaker_edge_refusals_total{reason} counts every one.
"""

from __future__ import annotations

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from app.audit.context import AuditContext
from app.audit.middleware import transport_for
from app.auth.authenticator import key_from_headers
from app.edge.limiter import Block, EdgeLimiter
from app.resources import Resources
from app.tasks.websocket import presented_key

# Paths that are never limited, with everything under them; the audit log leaves out the same ones.
EXEMPT = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/dashboard")
_PROBLEM = (b"content-type", b"application/problem+json")


def exempt(path: str) -> bool:
    if not path.startswith(EXEMPT):
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in EXEMPT)


class EdgeMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        client = scope.get("client")
        if (kind != "http" and kind != "websocket") or client is None or exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        resources: Resources | None = scope.get("state", {}).get("resources")
        if resources is not None and await refused(scope, receive, send, resources):
            return
        await self.app(scope, receive, send)


async def refused(
    scope: Scope,
    receive: Receive,
    send: Send,
    resources: Resources,
    key_headers: tuple[bytes | None, bytes | None] | None = None,
) -> bool:
    """Count the request of its client's address; True when it was refused here (its 429 sent).

    The middleware's work, also for the fast path (app/fast_path.py), which
    hands over the Authorization and X-API-Key headers it has already found (`key_headers`)."""
    edge = resources.edge
    client = scope.get("client")
    if edge is None or client is None:
        return False
    known: bool | None = None
    if edge.shared:
        # Counted in Redis: a request with a known key is served whatever its count says, so it does
        # not wait for it (one round trip of three per request on Redis limits).
        known = resources.authenticator.knows(_presented(scope, receive, send, key_headers))
        if known:
            edge.admit_later(client[0])
            return False
    block = await edge.admit(client[0])
    if block is None:
        return False
    if known is None:
        known = resources.authenticator.knows(_presented(scope, receive, send, key_headers))
    if not known:
        await _refuse(scope, send, resources, edge, block, client[0])
        return True
    edge.metrics.known_key.inc()
    return False


def _presented(
    scope: Scope, receive: Receive, send: Send, key_headers: tuple[bytes | None, bytes | None] | None
) -> str | None:
    """The key the request presents, read as the route will read it (from `key_headers` if given)."""
    if key_headers is not None:
        authorization, x_api_key = (None if value is None else value.decode("latin-1") for value in key_headers)
        return key_from_headers(authorization, x_api_key)
    if scope["type"] == "websocket":
        return presented_key(WebSocket(scope, receive, send))[0]
    headers = Headers(scope=scope)
    return key_from_headers(headers.get("authorization"), headers.get("x-api-key"))


async def _refuse(
    scope: Scope, send: Send, resources: Resources, edge: EdgeLimiter, block: Block, address: str
) -> None:
    error = block.refusal(edge.clock())
    edge.metrics.refusals.labels(block.reason).inc()
    websocket = scope["type"] == "websocket"
    if not block.audited and resources.audit is not None:
        block.audited = True
        headers = Headers(scope=scope)
        row = AuditContext(
            request_id=scope["state"].get("request_id") or "",
            route=scope["path"],
            transport="ws" if websocket else transport_for(scope["path"]),
            client_ip=address,
            user_agent=headers.get("user-agent"),
        )
        row.status, row.error_code, row.http_status = "rejected", error.code, error.status
        resources.audit.submit(row.row())
    body = orjson.dumps(error.problem(scope["state"].get("request_id")))
    headers_out = [
        _PROBLEM,
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.response_headers().items()),
    ]
    if not websocket:
        await send({"type": "http.response.start", "status": error.status, "headers": headers_out})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        # The denial the handshake refusals of app/tasks/websocket.py send (app/server.py logs no error for it).
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers_out})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # the server answers 403
