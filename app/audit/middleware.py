"""Pure ASGI middleware that gives every HTTP request an audit context and submits its row before its last byte."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.audit.context import AuditContext, audit_var
from app.observability import tracing

NOT_AUDITED = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/dashboard")


class AuditMiddleware:
    """Sits inside the request-id middleware and outside everything that can refuse a request.

    So refused requests (body limit, auth, validation, enforcement) get their row too. Operational
    endpoints (health, metrics, docs) are not audited: probes and scrapes would drown the log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or _not_audited(path):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        context = AuditContext(
            request_id=state.get("request_id") or "",
            route=path,
            transport=transport_for(path),
            client_ip=scope["client"][0] if scope.get("client") else None,
            user_agent=_header(scope, b"user-agent"),
            trace_id=tracing.current_trace_id() if tracing.TRACER is not None else None,  # the request span's
        )
        state["audit"] = context
        token = audit_var.set(context)
        sink = getattr(state.get("resources"), "audit", None)
        submitted = False

        def submit() -> None:
            nonlocal submitted
            if submitted:
                return
            submitted = True
            template = getattr(scope.get("route"), "path", None)
            if template:
                context.route = template  # the template, e.g. /v1/tools/{name}/invoke
            if sink is not None and not context.owned_by_task:
                sink.submit(context.row())

        async def send_and_note(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                context.http_status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                # Journaled before the last byte goes out: a crash after the client has its
                # whole answer cannot lose the row.
                submit()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            if context.http_status is None:
                context.http_status = 500
            raise
        finally:
            audit_var.reset(token)
            submit()  # no complete response (a client gone, a failure): the row goes now


def _not_audited(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in NOT_AUDITED)


def transport_for(path: str) -> str:
    """The audit row's transport of an HTTP request to `path` (before its route is known)."""
    if path.startswith("/v1/chat/") or path == "/v1/models":
        return "openai"
    if path.startswith("/v1/tools"):
        return "tool"
    if path.startswith("/v1/tasks"):
        return "json"
    return "http"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
