"""create_app(settings): middleware, error handlers and routers; resources come from the lifespan."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__
from app.audit import router as audit
from app.audit.middleware import AuditMiddleware
from app.config import Settings, load_settings
from app.cors import CorsMiddleware, origin_matcher
from app.dashboard import install_dashboard
from app.edge.middleware import EdgeMiddleware
from app.fast_path import FastPath, FastRoute
from app.lifespan import build_lifespan
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware, TrafficCounters
from app.observability import health
from app.observability.http_metrics import HttpMetricsMiddleware
from app.observability.logging import configure_logging
from app.observability.metrics import Metrics
from app.openai_compat import router as openai_compat
from app.openai_compat.errors import openai_error_response
from app.openapi import install_openapi
from app.problems import install_problem_handlers, problem_response, rendering_errors
from app.sessions import router as sessions
from app.tasks import router as tasks
from app.tasks import websocket
from app.tools import router as tools

DESCRIPTION = (
    "Pacemaker runs agent tasks (LLM <-> tool loops) for its callers: authenticated, limited, "
    "streamed over SSE or WebSocket, and compatible with OpenAI's chat-completions API. "
    "Errors are application/problem+json with a stable `code` (OpenAI's envelope on the OpenAI routes)."
)


class PacemakerApp(FastAPI):
    """FastAPI, with the hottest routes' fast path in front of everything (app/fast_path.py): in front of
    FastAPI's own entry too, whose native-telemetry check read the environment on every request (3 % of
    the chat route's CPU)."""

    settings: Settings
    metrics: Metrics
    counters: TrafficCounters
    _front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self._front
        if front is None:
            front = self._front = self._build_front()
        await front(scope, receive, send)

    def _build_front(self) -> ASGIApp:
        rest = super().__call__  # FastAPI's entry: its telemetry, then the whole stack
        server = self.settings.server
        routes = []
        if server.chat_fast_path:
            chat = _post_route(openai_compat.router, "/v1/chat/completions")
            routes.append(FastRoute(chat, rendering_errors(openai_compat.chat_completions, openai_error_response)))
        if server.tasks_fast_path:
            routes.append(
                FastRoute(
                    _post_route(tasks.router, "/v1/tasks"),
                    rendering_errors(tasks.create_task_directly, problem_response),
                )
            )
        if not routes or self.root_path:
            return rest
        return FastPath(
            rest,
            owner=self,
            routes=routes,
            metrics=self.metrics,
            counters=self.counters,
            max_body_bytes=self.settings.server.max_body_bytes,
            cors_on=not origin_matcher(tuple(self.settings.server.cors.allow_origins)).empty,
        )


def _post_route(router: APIRouter, path: str) -> APIRoute:
    """The route object the router puts in scope["route"] (its template names the audit row and the metrics)."""
    return next(
        route
        for route in router.routes
        if isinstance(route, APIRoute) and route.path == path and "POST" in (route.methods or ())
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    configure_logging(settings)
    metrics = Metrics()
    counters = TrafficCounters()
    app = PacemakerApp(
        title="Pacemaker",
        version=__version__,
        description=DESCRIPTION,
        lifespan=build_lifespan(settings, metrics, counters),
    )
    app.settings, app.metrics, app.counters = settings, metrics, counters
    install_problem_handlers(app)
    install_openapi(app, example_model=settings.tiers.small)
    # The busiest routes first: the router tries them in order.
    app.include_router(openai_compat.router)
    app.include_router(tasks.router)
    app.include_router(websocket.router)
    app.include_router(tools.router)
    app.include_router(sessions.router)
    app.include_router(audit.router)
    app.include_router(health.router)
    install_dashboard(app)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.server.max_body_bytes)
    app.add_middleware(AuditMiddleware)  # outside the body limit, so a refused body is audited too
    app.add_middleware(EdgeMiddleware)  # per-address limits: a refused flood costs no key lookup, nor a row each
    app.add_middleware(CorsMiddleware, settings=settings.server.cors)  # preflights answered, never audited
    app.add_middleware(RequestContextMiddleware, counters=counters)  # outermost: everything gets an id
    return app
