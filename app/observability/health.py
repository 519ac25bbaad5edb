"""Health: a JSON summary, liveness (the process answers) and readiness (it can serve traffic)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from app import __version__
from app.dependencies import ResourcesDep
from app.enforcement.breaker import BreakerState
from app.errors import NotFound
from app.sessions.base import SessionStore

router = APIRouter(tags=["health"])

READINESS_TIMEOUT_S = 2.0


class HealthOut(BaseModel):
    status: str
    version: str
    uptime_seconds: float
    active_requests: int
    total_requests: int


class ReadinessOut(BaseModel):
    status: str
    checks: dict[str, str]


@router.get("/health", response_model=HealthOut, summary="Service state")
async def health(resources: ResourcesDep) -> HealthOut:
    counters = resources.counters
    return HealthOut(
        status="ok",
        version=__version__,
        uptime_seconds=round(time.monotonic() - counters.started_at, 3),
        active_requests=counters.active_requests,
        total_requests=counters.total_requests,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "The metrics, in text format"},
        404: {"description": "Metrics are off on this server (server.metrics: false)"},
    },
)
async def metrics(resources: ResourcesDep) -> Response:
    if not resources.settings.server.metrics:
        raise NotFound("Metrics are off on this server (server.metrics).")
    return Response(generate_latest(resources.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/health/live", summary="Liveness: the process is serving")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/health/ready",
    response_model=ReadinessOut,
    summary="Readiness: can this instance serve traffic (degraded dependencies are reported, not fatal)",
    responses={503: {"model": ReadinessOut, "description": "This instance cannot serve traffic"}},
)
async def ready(resources: ResourcesDep) -> JSONResponse:
    """200 `ready`, 200 `degraded` (serving, with a dependency down that the design absorbs), or 503.

    A database outage is absorbed (audit rows wait on disk, cached keys keep working), and so is
    Redis under fail_open; if readiness failed on them, every replica would leave the load balancer
    at once and a short outage would become a full one. 503 means this instance itself cannot
    serve: rate limits fail closed with Redis down, or audit rows cannot be kept on disk.
    """
    checks: dict[str, str] = {}
    fatal: list[str] = []
    degraded: list[str] = []

    def report(name: str, outcome: str, when_down: list[str]) -> None:
        checks[name] = outcome
        if outcome != "ok":
            when_down.append(name)

    report("database", await _check_database(resources), degraded)
    if resources.redis is not None:
        fail_closed = resources.settings.limits.redis_failure_policy == "fail_closed"
        report("redis", await _check_redis(resources), fatal if fail_closed else degraded)
    if resources.audit is not None:
        audit = resources.audit
        if audit.spool_error is not None:
            report("audit", f"error: rows cannot be kept on disk ({audit.spool_error})", fatal)
        else:
            report("audit", "ok" if audit.database_ok else "spooling", degraded)
        if audit.dead_lettered:
            # Rows the database can never take were set aside: serving goes on, the operator should look.
            checks["audit_dead_letters"] = f"{audit.dead_lettered} rows set aside; last: {audit.last_dead_letter}"
    sessions = resources.tasks.sessions
    session_store = await _check_sessions(sessions.store) if sessions is not None else None
    if session_store is not None:
        # Degraded, not fatal: only tasks with a session_id are refused (503 session_unavailable).
        report("sessions", session_store, degraded)
    breakers = resources.enforcer.breakers.states()
    tripped = sorted(name for name, state in breakers.items() if state is not BreakerState.CLOSED)
    report("breakers", "open: " + ", ".join(tripped) if tripped else "ok", degraded)
    shedding = resources.shedder.reason
    # Not fatal: in a surge every replica sheds at once, and leaving the load balancer all together
    # would refuse everything; the instance still serves what it admitted (and health, and metrics).
    report("load", f"shedding: {shedding}" if shedding else "ok", degraded)
    if resources.drain.draining:
        # Shutting down: load balancers must stop sending here, whatever else holds.
        report("drain", "draining: in-flight work is ending", fatal)
    status = "unavailable" if fatal else "degraded" if degraded else "ready"
    if resources.drain.draining:
        status = "draining"
    return JSONResponse({"status": status, "checks": checks}, status_code=503 if fatal else 200)


async def _check_redis(resources: ResourcesDep) -> str:
    assert resources.redis is not None
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            await resources.redis.ping()
    except TimeoutError:
        return f"timed out after {READINESS_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


async def _check_sessions(store: SessionStore) -> str | None:
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            return await store.check()
    except TimeoutError:
        return f"timed out after {READINESS_TIMEOUT_S:g} s"


async def _check_database(resources: ResourcesDep) -> str:
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            async with resources.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except TimeoutError:
        return f"timed out after {READINESS_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"
