"""uvicorn as `pacemaker serve` runs it: its options, and logging that redacts credentials."""

from __future__ import annotations

import copy
from typing import Any

from uvicorn.config import LOGGING_CONFIG

from app.config import Settings

APP = "app.main:create_app"
GRACEFUL_SHUTDOWN_S = 30


def uvicorn_options(
    settings: Settings, *, host: str | None = None, port: int | None = None, workers: int = 1
) -> dict[str, Any]:
    """Keyword arguments for uvicorn.run."""
    return {
        "factory": True,
        "host": host or settings.server.host,
        "port": port or settings.server.port,
        "workers": workers,
        "access_log": settings.server.access_log,
        "proxy_headers": settings.server.proxy_headers,
        "forwarded_allow_ips": settings.server.forwarded_allow_ips,
        "log_level": settings.log_level.lower(),
        "log_config": log_config(),
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }


def run(options: dict[str, Any]) -> None:
    import uvicorn

    uvicorn.run(APP, **options)


def log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration (same lines, same streams) with the redacting filter on every handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": "app.observability.logging.RedactingFilter"}}
    # Records of other libraries (asyncio, aiohttp, websockets...) reach the root logger, which has no
    # handler and would print them, unfiltered, through logging.lastResort.
    config["formatters"]["other"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["other"] = {"formatter": "other", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["other"], "level": "WARNING"}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    return config
