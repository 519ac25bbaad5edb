"""Builds every resource the app uses at startup and closes them at shutdown."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.ledger import AuditLedger
from app.audit.sink import AuditSink
from app.auth.authenticator import Authenticator
from app.config import Settings
from app.db import create_engine, create_session_maker
from app.drain import Drain, install_signal_handlers
from app.edge.limiter import EdgeLimiter, build_edge
from app.enforcement.breaker import BreakerConfig, BreakerRegistry, BreakerState
from app.enforcement.concurrency import ConcurrencyLimiter, SocketLimiter
from app.enforcement.enforcer import Enforcer
from app.enforcement.idempotency import IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore
from app.enforcement.ledger import SpendLedger
from app.enforcement.limits import Limiter
from app.enforcement.memory_limiter import MemoryLimiter
from app.enforcement.retry import RetryPolicy
from app.enforcement.traced_limiter import TracedLimiter
from app.errors import ShuttingDown
from app.middleware import TrafficCounters
from app.observability import tracing
from app.observability.activity import Activity
from app.observability.activity_feed import ActivityFeed
from app.observability.metrics import Metrics
from app.overload import LoadShedder
from app.providers.registry import ProviderRegistry
from app.resources import Resources
from app.sandbox.sandbox import Sandbox
from app.sessions.conversation import start_conversations
from app.tasks.background import BackgroundTasks
from app.tasks.cancel_bus import CancelBus
from app.tasks.events import EventLog, MemoryEventLog
from app.tasks.leases import LeaseKeeper
from app.tasks.service import TaskService
from app.tasks.store import TaskStore
from app.tools.base import Tool
from app.tools.invoke import ToolInvoker
from app.tools.python import PythonTool
from app.tools.registry import ToolRegistry, builtin_tools

if TYPE_CHECKING:
    import aiohttp
    from redis.asyncio import Redis

# What only a deployment with Redis needs (redis itself is 8 MB of modules) is imported where it is built.

log = logging.getLogger(__name__)
GC_THRESHOLDS = (10_000, 10, 10)


def _http_tools(settings: Settings, stack: AsyncExitStack) -> list[Tool]:
    """The configured HTTP tools, each on the client its `allow_private` asks for (aiohttp, 8.8 MB of
    modules, is imported only where there is one)."""
    if not settings.tools.http:
        return []
    from app.tools.http import HttpTool, http_tool_session

    clients: dict[bool, aiohttp.ClientSession] = {}
    for cfg in settings.tools.http:
        if cfg.allow_private not in clients:
            clients[cfg.allow_private] = http_tool_session(allow_private=cfg.allow_private)
            stack.push_async_callback(clients[cfg.allow_private].close)
    return [HttpTool(cfg, clients[cfg.allow_private]) for cfg in settings.tools.http]


def _limits_redis(url: str | None) -> Redis | None:
    """The client for limits (and what shares it), or None without limits.redis_url (redis is not imported then)."""
    if url is None:
        return None
    from app.enforcement.redis_limiter import build_redis

    return build_redis(url)


def build_enforcer(
    settings: Settings, metrics: Metrics, redis: Redis | None, ledger: SpendLedger | None = None
) -> Enforcer:
    """The enforcement chain; budgets are seeded from `ledger` (None: they live in the limiter alone)."""
    limits = settings.limits
    limiter: Limiter
    if redis is None:
        limiter = MemoryLimiter()
    else:
        from app.enforcement.redis_limiter import RedisLimiter, limiter_scripts
        from app.enforcement.resilient_limiter import ResilientLimiter

        limiter = ResilientLimiter(
            RedisLimiter(redis, scripts=limiter_scripts(limits.redis_url)),
            # When Redis is down and we fail open, each instance allows its share of the limit.
            MemoryLimiter(scale=1 / limits.expected_instances),
            policy=limits.redis_failure_policy,
            expected_instances=limits.expected_instances,
            on_error=metrics.limiter_errors.inc,
        )
        if tracing.TRACER is not None:
            limiter = TracedLimiter(limiter, "redis")

    def on_breaker_change(name: str, state: BreakerState) -> None:
        metrics.breaker_state.labels(name).set(int(state))

    return Enforcer(
        limits,
        limiter,
        ConcurrencyLimiter(limits.global_max_in_flight),
        BreakerRegistry(BreakerConfig(**settings.breakers.model_dump()), on_change=on_breaker_change),
        RetryPolicy(**settings.retries.model_dump()),
        metrics,
        ledger=ledger,
        settle_in_background=redis is not None,  # a round trip: the answer does not wait for it
    )


def instance_id() -> str:
    """This process, among every instance sharing the database: in task records and their leases."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


async def _start_tasks(
    stack: AsyncExitStack,
    settings: Settings,
    metrics: Metrics,
    engine: AsyncEngine,
    providers: ProviderRegistry,
    tools: ToolRegistry,
    invoker: ToolInvoker,
    enforcer: Enforcer,
    audit: AuditSink | None,
) -> tuple[TaskService, BackgroundTasks]:
    """The task service and what background tasks need: records, the event log, cancels, leases.

    Closed in reverse: background tasks end first (their final events, records and audit rows
    written), then the cancel channel and the event log; the record writer last.
    """
    store = TaskStore(engine, settings.tasks, metrics)
    await store.start()
    stack.push_async_callback(store.stop)
    # Closed after background tasks end: their last turns are appended.
    sessions = await start_conversations(stack, settings, metrics.sessions)
    service = TaskService(
        settings=settings,
        providers=providers,
        tools=tools,
        invoker=invoker,
        enforcer=enforcer,
        metrics=metrics,
        audit=audit,
        store=store,
        instance_id=instance_id(),
        sessions=sessions,
        shared=(settings.events.redis_url or settings.limits.redis_url) is not None,
    )
    events_url = settings.events.redis_url or settings.limits.redis_url
    readers: Redis | None = None
    events: EventLog
    if events_url is None:
        events = MemoryEventLog(
            max_bytes=settings.events.max_bytes,
            max_events_per_task=settings.events.max_events_per_task,
            retention_s=settings.events.retention_s,
        )
    else:
        from app.enforcement.redis_limiter import build_redis
        from app.tasks.events.redis_streams import RedisEventLog, build_reader_redis

        writers, readers = build_redis(events_url), build_reader_redis(events_url)
        stack.push_async_callback(writers.aclose)
        stack.push_async_callback(readers.aclose)
        events = RedisEventLog(
            writers,
            readers=readers,
            retention_s=settings.events.retention_s,
            max_events_per_task=settings.events.max_events_per_task,
            max_bytes=settings.events.max_bytes,
            batch_ms=settings.events.batch_ms,
            batch_events=settings.events.batch_events,
            give_up_s=settings.events.redis_give_up_s,
        )
    stack.push_async_callback(events.aclose)
    background = BackgroundTasks(
        service, events, live=events_url is not None, providers=providers, audit=audit, metrics=metrics
    )
    cancels = CancelBus(readers, service.cancel_here)
    await cancels.start()
    stack.push_async_callback(cancels.stop)
    service.cancels = cancels
    leases = LeaseKeeper(
        store,
        lease_s=settings.tasks.lease_s,
        renew_s=settings.tasks.lease_renew_s,
        running=lambda: list(service.running),
        on_lost=background.lost,
    )
    await leases.start()
    stack.push_async_callback(leases.stop)
    shutting_down = ShuttingDown("The server is shutting down; start the task again.", retry_after=1.0)
    stack.push_async_callback(background.stop, shutting_down, settings.tasks.shutdown_timeout_s)
    return service, background


def build_lifespan(
    settings: Settings, metrics: Metrics, counters: TrafficCounters
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Each resource is registered for closing as soon as it exists, so a start that fails
        # halfway (the sandbox's runtime refused, say) still closes what was opened. Closing runs
        # in reverse: the audit sink flushes before the engine goes.
        async with AsyncExitStack() as stack:
            # First, so that it closes last: the spans of the final audit batches are exported too.
            tracer_provider = tracing.configure()
            if tracer_provider is not None:
                stack.push_async_callback(tracing.shutdown, tracer_provider)
            engine = create_engine(settings.database)
            stack.push_async_callback(engine.dispose)
            providers = ProviderRegistry(settings)  # each upstream's own connection pool (app/providers/http1.py)
            stack.push_async_callback(providers.aclose)
            session_maker = create_session_maker(engine)
            redis = _limits_redis(settings.limits.redis_url)
            if redis is not None:
                stack.push_async_callback(redis.aclose)
            idempotency: IdempotencyStore = (
                RedisIdempotencyStore(redis) if redis is not None else MemoryIdempotencyStore()
            )
            tools = [*builtin_tools(), *_http_tools(settings, stack)]
            sandbox = Sandbox(settings.sandbox) if settings.tools.python else None
            if sandbox is not None:
                # Compiles the guest in a subprocess on first start (seconds); the runtime loads on first use.
                startup = await sandbox.start()
                stack.push_async_callback(sandbox.close)
                made = "compiled the module" if startup.compiled else "module cache found"
                log.info("sandbox ready (%s; the runtime loads on the first run)", made)
                tools.append(PythonTool(sandbox, settings.sandbox))
            audit = AuditSink(engine, settings.audit, metrics) if settings.audit.enabled else None
            if audit is not None:
                await audit.start()
                stack.push_async_callback(audit.stop)
            # After the audit sink: budgets are seeded from the audit log, its unwritten rows included.
            ledger = AuditLedger(session_maker, pending=audit.pending_cost) if audit is not None else None
            enforcer = build_enforcer(settings, metrics, redis, ledger)
            stack.push_async_callback(enforcer.limiter.aclose)
            stack.push_async_callback(enforcer.settled)  # first: the settlements in flight, then the limiter
            tool_registry = ToolRegistry(tools)
            tool_invoker = ToolInvoker(enforcer.breakers, metrics)
            task_service, background = await _start_tasks(
                stack, settings, metrics, engine, providers, tool_registry, tool_invoker, enforcer, audit
            )
            # The dashboard's feed counts each audit row (one per request) and each task's start and end.
            activity = Activity(task_service.instance_id)
            if audit is not None:
                audit.observe = activity.observe
            task_service.activity = activity
            feed = ActivityFeed(activity, redis)
            drain = Drain(
                grace_s=settings.server.drain_grace_s,
                timeout_s=settings.server.drain_timeout_s,
                # Every admitted request (tasks, chat completions, tool calls) holds a concurrency slot.
                busy=lambda: max(enforcer.concurrency.in_flight, len(task_service.running)),
                cancel_all=task_service.cancel_all,
            )
            enforcer.draining = lambda: drain.draining
            shedder = LoadShedder(
                metrics, max_loop_lag_ms=settings.server.shed_loop_lag_ms, max_rss_mb=settings.server.shed_rss_mb
            )
            shedder.start()
            stack.push_async_callback(shedder.stop)
            enforcer.overloaded = shedder.refusal
            edge: EdgeLimiter | None = None
            if settings.server.edge.enabled:
                edge, edge_storage = build_edge(settings.server.edge, settings.limits.redis_url, metrics.edge)
                if edge_storage is not None:
                    stack.push_async_callback(edge_storage.aclose)
                    stack.push_async_callback(edge.counted)  # first: the counts in flight, then the storage
            resources = Resources(
                settings=settings,
                metrics=metrics,
                counters=counters,
                engine=engine,
                session_maker=session_maker,
                providers=providers,
                tools=tool_registry,
                authenticator=Authenticator(
                    session_maker,
                    cache_seconds=settings.auth.key_cache_seconds,
                    cache_size=settings.auth.key_cache_size,
                    lookup_timeout_s=settings.auth.lookup_timeout_s,
                    guard=edge,  # failed authentications per address, and lookups past them refused
                ),
                edge=edge,
                redis=redis,
                enforcer=enforcer,
                idempotency=idempotency,
                audit=audit,
                sandbox=sandbox,
                websockets=SocketLimiter(),
                tool_invoker=tool_invoker,
                tasks=task_service,
                background=background,
                activity=feed,
                drain=drain,
                shedder=shedder,
            )
            if install_signal_handlers(drain):  # under uvicorn's Server: SIGTERM drains first
                log.info("SIGTERM and SIGINT drain: grace %g s, timeout %g s", drain.grace_s, drain.timeout_s)
            await feed.start(resources)
            stack.push_async_callback(feed.stop)
            log.info(
                "pacemaker started: %d models, database %s", len(providers.routes()), engine.url.get_backend_name()
            )
            # Everything built so far lives as long as the process: keep the collector from walking
            # it again and again (full collections of it stalled requests for 50-75 ms in the benchmark).
            gc.freeze()
            # And collect less often: thousands of held streams are a few hundred live objects each, which
            # the default thresholds (700, 10, 10) walked again and again (29 % of the server's CPU in a
            # storm of 5,000 held streams, 12 % at 10,000/10/10).
            stack.callback(gc.set_threshold, *gc.get_threshold())  # as they were, once stopped (a test's process)
            gc.set_threshold(*GC_THRESHOLDS)
            yield {"resources": resources}
        log.info("pacemaker stopped")

    return lifespan
