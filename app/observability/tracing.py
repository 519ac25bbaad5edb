"""OpenTelemetry tracing, configured once at startup from the standard OTEL_* variables, and absent when off."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.errors import AppError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from app.agent.model_call import ModelCall
    from app.audit.context import AuditContext

log = logging.getLogger(__name__)

T = TypeVar("T")

# The process's tracer while tracing is on, None while it is off: the one check every hot path makes
# before it does any tracing work (a no-op tracer still makes span objects and churns contextvars).
# Process-wide, as OpenTelemetry's own provider is; set and cleared by the lifespan (configure, shutdown).
TRACER: Tracer | None = None

_PROPAGATOR = TraceContextTextMapPropagator()
_SCOPE = "pacemaker"
# The only OTLP transport installed (opentelemetry-exporter-otlp-proto-http).
_PROTOCOL = "http/protobuf"
_EXPORTERS = ("otlp", "console", "none")
_TRUE = ("true", "1", "yes")
# Probes and scrapes: every few seconds from every load balancer and Prometheus, nothing to trace.
_UNTRACED = ("/health", "/metrics")


# --- configuration ----------------------------------------------------------------------------


def exporter_from_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """The span exporter the standard variables ask for (otlp or console), None for tracing off.

    Off unless configured: an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or ..._TRACES_ENDPOINT) or
    OTEL_TRACES_EXPORTER turns it on; OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER=none keeps it off.
    A ConfigError names a variable asking for what cannot be served.
    """
    from app.config import ConfigError  # here: the settings import this module, through the middleware

    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter not in _EXPORTERS:
        raise ConfigError(
            f"invalid configuration:\n  OTEL_TRACES_EXPORTER: {exporter!r} is not supported (otlp, console or none)"
        )
    if exporter == "none":
        return None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not exporter:
        if not endpoint:
            return None
        exporter = "otlp"
    if exporter == "otlp":
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(variable, "").strip()
            if protocol:
                if protocol != _PROTOCOL:
                    raise ConfigError(
                        f"invalid configuration:\n  {variable}: {protocol!r} is not supported; Pacemaker exports"
                        f" spans over OTLP {_PROTOCOL} only"
                    )
                break
    return exporter


def configure(environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """Turn tracing on as the environment says (or leave it off: None), for the whole process.

    Everything but the on/off decision is the SDK's own reading of the standard variables: the
    resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), the sampler (OTEL_TRACES_SAMPLER, its
    _ARG), the exporter (endpoint, headers, timeout, compression, certificates) and the batch
    processor (OTEL_BSP_*).
    """
    global TRACER
    exporter_name = exporter_from_environment(environ)
    if exporter_name is None:
        return None
    # Imported here: a process with tracing off never loads the SDK.
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "pacemaker"}))
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    TRACER = provider.get_tracer(_SCOPE, __version__)
    log.info("tracing on: spans exported over %s (%s)", exporter_name, provider.sampler.get_description())
    return provider


async def shutdown(provider: TracerProvider) -> None:
    """Tracing off again, after the spans still queued are exported (in a thread: it blocks)."""
    global TRACER
    TRACER = None
    await asyncio.to_thread(provider.shutdown)


# --- what other code reads ----------------------------------------------------------------------


def current_trace_id() -> str | None:
    """The W3C trace id (32 hex digits) of the current span, None when there is none."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def trace_id_of(span: Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def outgoing_headers(headers: dict[str, str], request_id: str | None) -> dict[str, str]:
    """`headers` plus the request id and, with tracing on, the current span's traceparent (W3C)."""
    if TRACER is None:
        return {**headers, "x-request-id": request_id} if request_id else headers
    headers = {**headers, "x-request-id": request_id} if request_id else {**headers}
    _PROPAGATOR.inject(headers)
    return headers


def failed(span: Span, code: str, detail: str | None = None) -> None:
    """Mark `span` as failed with the stable error code (error.type), the detail as the status description."""
    span.set_attribute("error.type", code)
    span.set_status(Status(StatusCode.ERROR, detail or code))


# --- requests -----------------------------------------------------------------------------------


async def traced_request(app: ASGIApp, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
    """Run an HTTP request under a SERVER span that continues the caller's traceparent, if any.

    A WebSocket gets no span of its own (it may stay open for hours): the caller's trace context,
    if it sent one, is the parent of the socket's tasks. Health probes and metrics scrapes get none.
    """
    assert TRACER is not None
    path: str = scope.get("path", "")
    if path.startswith(_UNTRACED):
        await app(scope, receive, send)
        return
    carrier: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name == b"traceparent" or name == b"tracestate":
            carrier[name.decode()] = value.decode("latin-1")
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    if scope["type"] != "http":
        token = otel_context.attach(parent) if parent is not None else None
        try:
            await app(scope, receive, send)
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    method: str = scope["method"]
    span = TRACER.start_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        # Few attributes: each costs microseconds to record and more to encode (measured, benchmarks/tracing.py).
        attributes={
            "http.request.method": method,
            "url.path": path,
            "pacemaker.request_id": request_id,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    status = 500

    async def send_noting_status(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await app(scope, receive, send_noting_status)
    finally:
        otel_context.detach(token)
        route = getattr(scope.get("route"), "path", None)
        audit = scope.get("state", {}).get("audit")
        code = getattr(audit, "error_code", None)
        if route:
            span.update_name(f"{method} {route}")
            span.set_attributes({"http.route": route, "http.response.status_code": status})
        else:
            span.set_attribute("http.response.status_code", status)
        if status >= 500:
            failed(span, code or str(status))
        elif code:
            span.set_attribute("error.type", code)  # a refusal (4xx) says why, without being the server's error
        span.end()


# --- tasks, model calls, tools ------------------------------------------------------------------


def start_task(audit: AuditContext) -> Span:
    """The span of one agent task (invoke_agent), a child of the current span; its trace id goes in `audit`."""
    assert TRACER is not None
    span = TRACER.start_span(
        "invoke_agent pacemaker",
        kind=SpanKind.INTERNAL,
        attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "pacemaker"},
    )
    audit.trace_id = trace_id_of(span)
    return span


def current(span: Span) -> Token[Context]:
    """Make `span` the current one; pass what this returns to `restore`."""
    return otel_context.attach(trace.set_span_in_context(span))


def restore(token: Token[Context]) -> None:
    otel_context.detach(token)


def task_admitted(span: Span, audit: AuditContext, transport: str) -> None:
    attributes: dict[str, Any] = {
        "gen_ai.agent.id": audit.task_id or "",
        "gen_ai.provider.name": audit.provider or "",
        "gen_ai.request.model": audit.model or "",
        "pacemaker.task.id": audit.task_id or "",
        "pacemaker.transport": transport,
    }
    if audit.session_id:
        attributes["gen_ai.conversation.id"] = audit.session_id
    span.set_attributes(attributes)


def end_task(span: Span, audit: AuditContext) -> None:
    """End a task's span with what its audit row says: the model that answered, tokens, the error code."""
    span.set_attributes(
        {
            "gen_ai.response.model": audit.model or "",
            "gen_ai.usage.input_tokens": audit.prompt_tokens,
            "gen_ai.usage.output_tokens": audit.completion_tokens,
            "pacemaker.status": audit.status or "",
            "pacemaker.tool_calls": len(audit.tool_names),
        }
    )
    if audit.error_code:
        failed(span, audit.error_code)
    span.end()


async def in_span(span: Span, events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """`events`, each step run with `span` current (so model and tool calls are its children).

    Never current across a yield: a suspended generator would carry the context into its consumer.
    """
    ctx = trace.set_span_in_context(span)
    try:
        while True:
            token = otel_context.attach(ctx)
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield event
    finally:
        token = otel_context.attach(ctx)
        try:
            await events.aclose()
        finally:
            otel_context.detach(token)


def start_chat(call: ModelCall) -> Span:
    """The span of one model call (chat), a child of the current span (the task, or the request)."""
    assert TRACER is not None
    route, request = call.route, call.request
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": route.provider.name,
        "gen_ai.request.model": request.model,
    }
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if request.temperature is not None:
        attributes["gen_ai.request.temperature"] = request.temperature
    return TRACER.start_span(f"chat {request.model}", kind=SpanKind.CLIENT, attributes=attributes)


async def first_chunk(span: Span, chunks: AsyncGenerator[T, None]) -> T:
    """The provider's first chunk, with `span` current while the request is made (its traceparent)."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return await anext(chunks)
    finally:
        otel_context.detach(token)


def end_chat(span: Span, call: ModelCall, outcome: str, usage: Any, finish_reason: str | None) -> None:
    attributes: dict[str, Any] = {"gen_ai.response.model": call.request.model, "pacemaker.model": call.route.name}
    if call.retries:
        attributes["pacemaker.retries"] = call.retries
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
    if finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
    span.set_attributes(attributes)
    for fallback in call.fallbacks:
        span.add_event("model.fallback", {"model": fallback.model, "fallback": fallback.fallback})
    if outcome not in ("ok", "cancelled"):
        failed(span, outcome)
    span.end()


async def traced_tool(name: str, call: Awaitable[T], outcome: Callable[[T], tuple[str | None, str | None]]) -> T:
    """Await a tool call under its span (execute_tool), current while the tool runs (an HTTP tool's traceparent).

    `outcome` reads the call's result as (error code, detail); (None, None) for a success.
    """
    assert TRACER is not None
    span = TRACER.start_span(
        f"execute_tool {name}",
        kind=SpanKind.INTERNAL,
        attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name},
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        result = await call
    except BaseException as exc:
        failed(span, "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__)
        raise
    else:
        code, detail = outcome(result)
        if code is not None:
            failed(span, code, detail)
        return result
    finally:
        otel_context.detach(token)
        span.end()


# --- sandbox runs, limiter calls, batches -----------------------------------------------------------


async def traced(
    name: str,
    call: Awaitable[T],
    attributes: dict[str, Any],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    after: Callable[[Span, T], None] | None = None,
) -> T:
    """Await `call` under a child span of the current one; an exception marks it failed with its code."""
    assert TRACER is not None
    span = TRACER.start_span(name, kind=kind, attributes=attributes)
    started = time.perf_counter()
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        result = await call
    except BaseException as exc:
        # Our errors' stable code; anything else by its class (SQLAlchemy's `code` is a documentation link).
        failed(span, exc.code if isinstance(exc, AppError) else type(exc).__name__, str(exc)[:300] or None)
        raise
    else:
        if after is not None:
            after(span, result)
        return result
    finally:
        otel_context.detach(token)
        span.set_attribute("pacemaker.duration_ms", round((time.perf_counter() - started) * 1000, 3))
        span.end()
