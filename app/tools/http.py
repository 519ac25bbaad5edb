"""HTTP tools declared in configuration: a name, a JSON Schema, and one URL that is the only one called.

Arguments are validated against the schema, then sent as the query string (GET, DELETE) or a JSON
body. Redirects are followed only within the declared origin; responses are capped in size; and
the URL may not reach a private, loopback or link-local address unless the tool allows it, checked
on every address the name resolves to (so a DNS answer cannot smuggle one in).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from app.config import HttpToolSettings, env_value
from app.middleware import request_id_var
from app.observability import tracing
from app.tools.base import Tool, ToolContext, ToolError, ToolUnavailable

MAX_REDIRECTS = 3
_QUERY_METHODS = ("GET", "DELETE")


class HttpTool(Tool):
    def __init__(self, settings: HttpToolSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        self.description = settings.description
        self.timeout_s = settings.timeout_s
        self._settings = settings
        self._session = session
        from jsonschema import Draft202012Validator  # 3 MB of modules: only with an HTTP tool configured

        self._validator = Draft202012Validator(settings.parameters)
        self._origin = _origin(settings.url)
        # Secrets come from the environment, read once at startup, and never appear in the schema.
        self._headers = {header: env_value(variable) or "" for header, variable in settings.headers_from_env.items()}

    @property
    def parameters(self) -> dict[str, Any]:
        return self._settings.parameters

    def parse_arguments(self, raw: str | dict[str, Any]) -> Any:
        try:
            arguments = orjson.loads(raw or "{}") if isinstance(raw, str) else raw
        except orjson.JSONDecodeError:
            raise ToolError(f"invalid arguments for {self.name}: not JSON") from None
        errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            problems = "; ".join(f"{'.'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in errors[:5])
            raise ToolError(f"invalid arguments for {self.name}: {problems}")
        return arguments

    async def run(self, arguments: Any, context: ToolContext) -> Any:
        settings = self._settings
        url = settings.url
        query = body = None
        if settings.method in _QUERY_METHODS:
            query = {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in arguments.items()}
        else:
            body = orjson.dumps(arguments)
        headers = {**self._headers, **({"Content-Type": "application/json"} if body is not None else {})}
        headers = tracing.outgoing_headers(headers, request_id_var.get())  # x-request-id, traceparent
        timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        for _ in range(MAX_REDIRECTS + 1):
            if not settings.allow_private:
                _refuse_private_literal(url)
            try:
                async with self._session.request(
                    settings.method,
                    url,
                    params=query,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        url = self._next_hop(url, response.headers.get("Location", ""))
                        continue
                    return self._result(response, await _read_capped(response, settings.max_response_bytes))
            except PrivateAddress as exc:
                raise ToolError(str(exc)) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ToolUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None
        raise ToolError(f"{self.name}: more than {MAX_REDIRECTS} redirects")

    def _next_hop(self, url: str, location: str) -> str:
        target = urljoin(url, location)
        if _origin(target) != self._origin:
            raise ToolError(f"{self.name}: refused a redirect to another origin ({_origin(target)})")
        return target

    def _result(self, response: aiohttp.ClientResponse, payload: bytes) -> Any:
        if len(payload) > self._settings.max_response_bytes:
            raise ToolError(f"{self.name}: response larger than {self._settings.max_response_bytes} bytes")
        text = payload.decode(response.charset or "utf-8", errors="replace")
        if response.status >= 500:
            raise ToolUnavailable(f"{self.name}: HTTP {response.status}: {text[:300]}")
        if response.status >= 400:
            raise ToolError(f"{self.name}: HTTP {response.status}: {text[:300]}")
        if response.content_type == "application/json":
            try:
                return {"status": response.status, "body": orjson.loads(payload)}
            except orjson.JSONDecodeError:
                pass
        return {"status": response.status, "body": text}


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, or cap + 1 bytes of it: enough to know it is too large, never more."""
    parts: list[bytes] = []
    size = 0
    async for part in response.content.iter_chunked(65536):
        parts.append(part)
        size += len(part)
        if size > cap:
            break
    return b"".join(parts)


class PrivateAddress(aiohttp.ClientError):
    """The tool's URL led to an address it may not reach."""


def _is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified


def _refuse_private_literal(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        private = _is_private(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if private:
        raise ToolError(f"refused: {host} is a private or loopback address")


class GuardedResolver(AbstractResolver):
    """Resolves names, refusing answers that point into private, loopback or link-local ranges."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        for answer in answers:
            if _is_private(answer["host"]):
                raise PrivateAddress(f"refused: {host} resolves to the private address {answer['host']}")
        return answers

    async def close(self) -> None:
        await self._resolver.close()


def http_tool_session(allow_private: bool) -> aiohttp.ClientSession:
    """The client for HTTP tools: private addresses refused at resolution unless the tool allows them."""
    resolver: AbstractResolver = DefaultResolver() if allow_private else GuardedResolver()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=resolver, limit=256), trust_env=False, auto_decompress=True
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port
