"""uvicorn as `pacemaker serve` runs it: its options, logging that redacts credentials, a request-head timeout."""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import resource
from pathlib import Path
from typing import Any, cast

from uvicorn._types import ASGISendEvent
from uvicorn.config import LOGGING_CONFIG, Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from app.config import ConfigError, Settings
from app.observability import tracing

APP = "app.main:create_app"
GRACEFUL_SHUTDOWN_S = 10
_TIMEOUT_BODY = b"Request Timeout"
_LINGER_S = 2.0
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")

log = logging.getLogger("app.server")


def uvicorn_options(
    settings: Settings, *, host: str | None = None, port: int | None = None, workers: int = 1
) -> dict[str, Any]:
    """Keyword arguments for uvicorn.run; a ConfigError for a combination that cannot be served."""
    if workers > 1 and settings.limits.redis_url is None:
        raise ConfigError(
            "invalid configuration:\n"
            f"  --workers: {workers} workers with in-process limits would each keep their own copy of every"
            " rate limit and budget (a key could spend its budget once per worker); set limits.redis_url to"
            " share them, or run one worker per container"
        )
    tracing.exporter_from_environment()  # OTEL_* asking for what cannot be exported: a ConfigError now, not at start
    if workers > 1 and settings.server.metrics:
        raise ConfigError(
            "invalid configuration:\n"
            f"  --workers: with {workers} workers each scrape of /metrics would reach one of them and get that"
            " process's figures only; run one worker per container (and scale containers), or set"
            " server.metrics: false"
        )
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
        "backlog": settings.server.backlog,
        "http": head_timeout_protocol(settings.server.header_timeout_s, settings.server.max_header_bytes),
        "ws": DenialAwareWebSocketProtocol,
        # uvicorn's own wait comes after the drain (app/drain.py): by then only idle connections
        # and what the drain timeout cut are left.
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }


def run(options: dict[str, Any]) -> None:
    import uvicorn

    uvicorn.run(APP, **options)


def prepare_process(settings: Settings) -> None:
    """What `serve` does before uvicorn starts (workers inherit it): the open-files limit raised, the backlog
    checked against the kernel's cap; both logged."""
    from app.observability.logging import configure_logging

    configure_logging(settings)  # the app's own handler on "app" (create_app sets the same one again)
    before, after, hard = raise_open_files_limit()
    if after > before:
        log.info("open files limit raised from %d to %d (the hard limit)", before, after)
    elif after < hard:
        log.warning("open files limit %d could not be raised to the hard limit %d", after, hard)
    else:
        log.info("open files limit %d (the hard limit)", after)
    if warning := backlog_warning(settings.server.backlog, somaxconn()):
        log.warning("%s", warning)


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit: (soft before, soft after, hard).

    Every held stream is two descriptors (the client's connection and the upstream's), and the usual
    soft default (1,024) would refuse new connections past about 500 streams.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # macOS: the soft limit may not be infinite
        target = max(soft, 1_048_576) if soft != resource.RLIM_INFINITY else soft
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft, hard
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def somaxconn(path: Path = SOMAXCONN) -> int | None:
    """net.core.somaxconn, the kernel's cap on a listen backlog; None where it cannot be read (not Linux)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def backlog_warning(backlog: int, cap: int | None) -> str | None:
    """What to log when the kernel will cut server.backlog, or None."""
    if cap is None or backlog <= cap:
        return None
    return (
        f"server.backlog {backlog} is above net.core.somaxconn {cap}: the kernel holds at most {cap} connections"
        f" waiting to be accepted (raise it with: sysctl -w net.core.somaxconn={backlog})"
    )


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


def head_timeout_protocol(header_timeout_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    # uvicorn calls its protocol class with keyword arguments, and pickles it to worker processes:
    # a partial of a module-level class does both, carrying the settings with it.
    protocol = functools.partial(
        HeadTimeoutProtocol, header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes
    )
    return cast("type[asyncio.Protocol]", protocol)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request head over the size limit."""


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request head does not arrive in time,
    or is larger than `max_header_bytes` (431).

    uvicorn itself waits for a head forever (slowloris), and takes one of any size. The clock starts
    when the connection opens and, on a kept-alive connection, at the first byte of each later
    request: the idle time between requests is left to uvicorn's keep-alive timeout. A head that
    arrives in one read costs no timer.
    """

    # In slots: uvicorn's protocol sets about 30 attributes already, and five more in its __dict__ would
    # take it past the size at which instances share their keys (1.6 KB more per connection).
    __slots__ = (
        "_discarding",
        "_head_bytes",
        "_head_timer",
        "_head_too_large",
        "_in_head",
        "header_timeout_s",
        "max_header_bytes",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
        max_header_bytes: int = 65_536,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._head_bytes = 0
        self._head_too_large = False
        self._discarding = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        # Also a connection that never sends a byte: uvicorn arms no timer for it.
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        if self._in_head and self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_too_large = False

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            # Stops the parser at once; uvicorn answers a parser error with send_400_response.
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        self._cancel_head_timer()
        self.transport.write(self._refusal(431, b"Request Header Fields Too Large"))
        # Closing with the rest of the head unread would reset the connection before the client
        # reads the answer: end our side, and drop what still comes for a moment.
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()  # before a WebSocket upgrade hands the transport to another protocol
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # uvicorn stopped reading (a request before this one is not done): the delay is ours.
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
            return
        # A 408 for a head begun, so a slow client learns why; a connection that sent nothing is
        # closed silently, as an idle one is, so that a client never reads a 408 as the answer to
        # a request it sends just then. No 408 in the middle of an earlier response either.
        if self._in_head and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(self._refusal(408, _TIMEOUT_BODY))
        self.logger.debug("%s - request head not complete within %ss: closed", self.client, self.header_timeout_s)
        self.transport.close()

    def _refusal(self, status: int, body: bytes) -> bytes:
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        return b"".join(content)


class DenialAwareWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, which logs an ERROR ("returned without completing handshake")
    for every handshake refused with an HTTP response; a refusal (a bad key, say) is a complete
    answer, and a flood of bad keys must not flood the error log."""

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True
