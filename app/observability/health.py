"""Health: a JSON summary, liveness (the process answers) and readiness (its dependencies answer)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from app import __version__
from app.audit.sink import AuditSink
from app.dependencies import ResourcesDep

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
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "The metrics, in text format"}},
)
async def metrics(resources: ResourcesDep) -> Response:
    return Response(generate_latest(resources.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/health/live", summary="Liveness: the process is serving")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/health/ready",
    response_model=ReadinessOut,
    summary="Readiness: the database, Redis (when configured) and the audit spool",
    responses={503: {"model": ReadinessOut, "description": "A dependency is down"}},
)
async def ready(resources: ResourcesDep) -> JSONResponse:
    checks = {"database": await _check_database(resources)}
    if resources.redis is not None:
        checks["redis"] = await _check_redis(resources)
    if resources.audit is not None:
        checks["audit"] = _check_audit(resources.audit)
    # Spooling keeps every row safe while the database is away (which its own check reports).
    ok = all(value in ("ok", "spooling") for value in checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)


def _check_audit(audit: AuditSink) -> str:
    if audit.spool_error is not None:
        return f"error: the spool cannot be written ({audit.spool_error})"
    return "ok" if audit.database_ok else "spooling"


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
