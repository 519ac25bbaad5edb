"""Cross-origin access for browsers: the `server.cors` settings, the origin check, and the CORS middleware."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Mapping, Sequence

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AppError
from app.middleware import request_id_var

# What a browser may send and read cross-origin. Access-Control-Expose-Headers takes names, not
# patterns, so the x-ratelimit-* family is spelt out.
DEFAULT_ALLOW_HEADERS = [
    "Authorization",
    "X-API-Key",
    "Content-Type",
    "Idempotency-Key",
    "Last-Event-ID",
    "X-Request-ID",
]
DEFAULT_EXPOSE_HEADERS = [
    "x-request-id",
    *(f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")),
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "x-pacemaker-cost-usd",
    "location",
    "idempotent-replayed",
]

_ORIGIN_PATTERN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<wildcard>\*\.)?(?P<host>[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>\*|[0-9]{1,5}))?"
)
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_MAX_ORIGIN_BYTES = 512


class CorsSettings(BaseModel):
    """`server.cors`: which web pages of other origins may call the API, and what they may send and read."""

    # A misspelt setting is an error, not silently ignored (as in every app.config section).
    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(
        default_factory=list,
        description="Exact origins (https://app.example.com), patterns (http://localhost:*, https://*.example.com),"
        " or '*' for any; empty: no cross-origin access.",
    )
    # Every method a route takes (a test holds it to openapi.json).
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "DELETE"])
    allow_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOW_HEADERS), description="'*': any.")
    expose_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_EXPOSE_HEADERS))
    max_age_s: int = Field(600, ge=0, le=86_400, description="How long a browser may cache a preflight's answer.")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parse_origin_pattern(origin)
        return origins

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            if not _TOKEN.fullmatch(method) or method == "*":
                raise ValueError(f"{method!r} is not an HTTP method")
        return [method.upper() for method in methods]

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _header_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if name != "*" and (not _TOKEN.fullmatch(name) or "*" in name):
                raise ValueError(f"{name!r} is not a header name (browsers match names exactly; '*' alone means any)")
        return names


def parse_origin_pattern(text: str) -> tuple[str, bool, str, str | None]:
    """(scheme, any subdomain, host, port or '*' or None) of an allowed-origin entry; ValueError if it is none.

    Normalised as browsers send origins: lower case, the scheme's default port dropped.
    """
    if text == "*":
        return "*", True, "*", "*"
    if text == "null":
        raise ValueError("'null' is the origin of every sandboxed frame and local file: allowing it allows them all")
    match = _ORIGIN_PATTERN.fullmatch(text.lower())
    if match is None:
        hint = " (an origin has no path, not even a trailing /)" if text.count("/") > 2 else ""
        raise ValueError(f"{text!r} is not an origin: scheme://host[:port], with *. or :* as wildcards{hint}")
    scheme, host, port = match["scheme"], match["host"], match["port"]
    if port is not None and port != "*":
        if not 1 <= int(port) <= 65535 or port != str(int(port)):
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535, or *")
        if _DEFAULT_PORTS.get(scheme) == port:
            port = None
    return scheme, match["wildcard"] is not None, host, port


class OriginMatcher:
    """Answers "may this origin call us", from the allowed-origin entries; results are cached by origin."""

    _CACHE_SIZE = 1024

    def __init__(self, entries: Sequence[str]) -> None:
        self.any = False
        exact: set[str] = set()
        patterns: list[str] = []
        for entry in entries:
            scheme, subdomains, host, port = parse_origin_pattern(entry)
            if scheme == "*":
                self.any = True
            elif not subdomains and port != "*":
                exact.add(f"{scheme}://{host}" + (f":{port}" if port else ""))
            else:
                pattern = re.escape(f"{scheme}://") + (r"(?:[a-z0-9-]+\.)+" if subdomains else "") + re.escape(host)
                pattern += r"(?::[0-9]{1,5})?" if port == "*" else (re.escape(f":{port}") if port else "")
                patterns.append(pattern)
        self.exact = frozenset(exact)
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self._seen: dict[bytes, bool] = {}

    @property
    def empty(self) -> bool:
        return not (self.any or self.exact or self._pattern)

    def allows(self, origin: bytes) -> bool:
        known = self._seen.get(origin)
        if known is not None:
            return known
        allowed = self._decide(origin)
        if len(self._seen) >= self._CACHE_SIZE:
            self._seen.clear()  # a flood of made-up origins must not grow the cache
        self._seen[origin] = allowed
        return allowed

    def _decide(self, origin: bytes) -> bool:
        if len(origin) > _MAX_ORIGIN_BYTES or origin == b"null":
            return False
        if self.any:
            return True
        text = origin.decode("latin-1")
        return text in self.exact or (self._pattern is not None and self._pattern.fullmatch(text) is not None)


@functools.lru_cache(maxsize=16)
def origin_matcher(entries: tuple[str, ...]) -> OriginMatcher:
    """One matcher per list of entries, shared by the middleware and every WebSocket handshake."""
    return OriginMatcher(entries)


def same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` names the host and port the request was sent to (its Host header).

    The scheme only decides the default port: behind a proxy that ends TLS, a page from
    https://example.com reaches us as plain ws:// with `Host: example.com`, and is still our own.
    """
    match = _ORIGIN_PATTERN.fullmatch(origin.lower())
    if match is None or match["wildcard"] or match["port"] == "*" or not host:
        return False
    default = _DEFAULT_PORTS.get(match["scheme"])
    host_name, host_port = _authority(host.lower())
    return (match["host"], match["port"] or default) == (host_name, host_port or default)


def _authority(host: str) -> tuple[str, str]:
    """(name, port or '') of a Host header value: `example.com`, `127.0.0.1:8000`, `[::1]:8000`."""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest.removeprefix(":")
    name, separator, port = host.rpartition(":")
    return (name, port) if separator else (host, "")


class OriginNotAllowed(AppError):
    status = 403
    code = "origin_not_allowed"
    title = "Origin not allowed"


def websocket_origin_refusal(cors: CorsSettings, headers: Mapping[str, str]) -> AppError | None:
    """The error refusing a WebSocket handshake for its Origin, or None when it may proceed.

    Browsers always send Origin and let any page open a socket anywhere, so this is the check that
    CORS is for HTTP. No Origin (a non-browser client) and our own origin are always allowed.
    """
    origin = headers.get("origin")
    if origin is None or same_origin(origin, headers.get("host")):
        return None
    if origin_matcher(tuple(cors.allow_origins)).allows(origin.encode("latin-1", "replace")):
        return None
    return OriginNotAllowed(f"Pages from {origin[:_MAX_ORIGIN_BYTES]} may not open this WebSocket (server.cors).")


class CorsMiddleware:
    """Answers preflights itself and adds the CORS headers to the responses of allowed origins.

    It sits outside the audit middleware: a preflight is the browser asking, not the caller
    calling, so it is answered before authentication and never audited. A request without an
    Origin header passes through after one scan of its headers.
    """

    def __init__(self, app: ASGIApp, settings: CorsSettings) -> None:
        self.app = app
        self.matcher = origin_matcher(tuple(settings.allow_origins))
        self._off = self.matcher.empty
        self._any_header = "*" in settings.allow_headers
        self._preflight_headers = [
            (b"access-control-allow-methods", ", ".join(settings.allow_methods).encode()),
            (b"access-control-max-age", str(settings.max_age_s).encode()),
            (b"vary", b"Origin, Access-Control-Request-Headers"),
        ]
        if not self._any_header:
            self._preflight_headers.append(
                (b"access-control-allow-headers", ", ".join(settings.allow_headers).encode())
            )
        self._response_headers = [(b"vary", b"Origin")]
        if settings.expose_headers:
            self._response_headers.append(
                (b"access-control-expose-headers", ", ".join(settings.expose_headers).encode())
            )

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing back the app's own coroutine when there is nothing to do: no frame
        # of ours for requests without an Origin (0.45 us less per request, measured in process).
        # With no origin allowed, only a preflight (an OPTIONS) needs a look: to be refused here.
        if scope["type"] != "http" or (self._off and scope["method"] != "OPTIONS"):
            return self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"origin":
                return self._with_origin(scope, receive, send, value)
        return self.app(scope, receive, send)

    async def _with_origin(self, scope: Scope, receive: Receive, send: Send, origin: bytes) -> None:
        if scope["method"] == "OPTIONS":
            requested = _header(scope, b"access-control-request-method")
            if requested is not None:
                await self._preflight(scope, origin, send)
                return
        if not self.matcher.allows(origin):
            # Answered as usual, without CORS headers: the browser keeps the response from the page.
            await self.app(scope, receive, send)
            return
        added = [(b"access-control-allow-origin", origin), *self._response_headers]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, scope: Scope, origin: bytes, send: Send) -> None:
        if not self.matcher.allows(origin):
            shown = origin[:_MAX_ORIGIN_BYTES].decode("latin-1")
            error = OriginNotAllowed(f"Pages from {shown} may not call this API (server.cors).")
            body = orjson.dumps(error.problem(request_id_var.get()))
            headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        # Every allowed method and header at once, whatever this preflight asked for: the browser
        # decides, and names what was missing in its console.
        headers = [(b"access-control-allow-origin", origin), *self._preflight_headers, (b"content-length", b"0")]
        if self._any_header:
            requested = _header(scope, b"access-control-request-headers")
            if requested:
                headers.append((b"access-control-allow-headers", requested))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
