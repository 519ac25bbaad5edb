"""Resources: everything the lifespan builds (and closes), as routes and sockets reach it.

Its own module so that routes depend on what they use, not on the code that builds it (app/lifespan.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.sink import AuditSink
from app.auth.authenticator import Authenticator
from app.config import Settings
from app.db import SessionMaker
from app.drain import Drain
from app.edge.limiter import EdgeLimiter
from app.enforcement.concurrency import SocketLimiter
from app.enforcement.enforcer import Enforcer
from app.enforcement.idempotency import IdempotencyStore
from app.middleware import TrafficCounters
from app.observability.activity_feed import ActivityFeed
from app.observability.metrics import Metrics
from app.overload import LoadShedder
from app.providers.registry import ProviderRegistry
from app.sandbox.sandbox import Sandbox
from app.tasks.background import BackgroundTasks
from app.tasks.service import TaskService

if TYPE_CHECKING:
    from redis.asyncio import Redis
from app.tools.invoke import ToolInvoker
from app.tools.registry import ToolRegistry


@dataclass(slots=True)
class Resources:
    # Every field is built by app/lifespan.py and closed by it.
    settings: Settings
    metrics: Metrics
    counters: TrafficCounters
    engine: AsyncEngine
    session_maker: SessionMaker
    providers: ProviderRegistry
    tools: ToolRegistry
    authenticator: Authenticator
    edge: EdgeLimiter | None  # per-address limits before authentication (app/edge/); None when server.edge is off
    redis: Redis | None
    enforcer: Enforcer
    idempotency: IdempotencyStore
    audit: AuditSink | None  # None when audit.enabled is false
    sandbox: Sandbox | None  # None when tools.python is false
    websockets: SocketLimiter
    tool_invoker: ToolInvoker  # every tool call, from the agent loop or a client
    tasks: TaskService
    background: BackgroundTasks
    drain: Drain
    shedder: LoadShedder  # load shedding (app/overload.py); samples the loop lag even when off
    activity: ActivityFeed  # the dashboard's live feed (WS subscribe topic activity)
