"""Builds every resource the app uses at startup and closes them at shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth.authenticator import Authenticator
from app.config import Settings
from app.db import SessionMaker, create_engine, create_session_maker
from app.middleware import TrafficCounters
from app.observability.metrics import Metrics
from app.providers.registry import ProviderRegistry
from app.tools.registry import ToolRegistry, builtin_tools

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Resources:
    settings: Settings
    metrics: Metrics
    counters: TrafficCounters
    engine: AsyncEngine
    session_maker: SessionMaker
    http: aiohttp.ClientSession
    providers: ProviderRegistry
    tools: ToolRegistry
    authenticator: Authenticator


def upstream_http_session(settings: Settings) -> aiohttp.ClientSession:
    """The one pooled client for every upstream: sized for thousands of concurrent streams."""
    limit = max((p.max_connections for p in settings.providers.values() if p.kind == "openai"), default=100)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        json_serialize=lambda value: orjson.dumps(value).decode(),
        # Upstream URLs are configured; never pick up proxies or credentials from the environment.
        trust_env=False,
        auto_decompress=True,
    )


def build_lifespan(
    settings: Settings, metrics: Metrics, counters: TrafficCounters
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        engine = create_engine(settings.database)
        http = upstream_http_session(settings)
        providers = ProviderRegistry(settings, http)
        session_maker = create_session_maker(engine)
        resources = Resources(
            settings=settings,
            metrics=metrics,
            counters=counters,
            engine=engine,
            session_maker=session_maker,
            http=http,
            providers=providers,
            tools=ToolRegistry(builtin_tools()),
            authenticator=Authenticator(
                session_maker,
                cache_seconds=settings.auth.key_cache_seconds,
                cache_size=settings.auth.key_cache_size,
            ),
        )
        log.info("pacemaker started: %d models, database %s", len(providers.routes()), engine.url.get_backend_name())
        try:
            yield {"resources": resources}
        finally:
            await providers.aclose()
            await http.close()
            await engine.dispose()
            log.info("pacemaker stopped")

    return lifespan
