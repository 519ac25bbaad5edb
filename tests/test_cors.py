"""CORS (`server.cors`) and the WebSocket Origin check, against real server processes, with httpx and websockets."""

from __future__ import annotations

import asyncio
import json
import shlex
import sqlite3
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from app.cors import CorsSettings, OriginMatcher, parse_origin_pattern, same_origin
from tests.support import ROOT, PacemakerServer, server_config, start_pacemaker

ALLOWED = ["https://app.example.com", "http://localhost:*", "https://*.example.org:8443"]
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("cors")
    config = server_config(workdir, None, server={"cors": {"allow_origins": ALLOWED, "max_age_s": 321}})
    started = start_pacemaker(workdir, config)
    yield started
    started.process.stop()


def audited_request_ids(server: PacemakerServer) -> set[str]:
    with sqlite3.connect(server.workdir / "pacemaker.db") as db:
        return {row[0] for row in db.execute("SELECT request_id FROM audit_record")}


async def wait_until_audited(server: PacemakerServer, request_id: str) -> set[str]:
    """Rows are written in batches: wait (bounded) for `request_id`'s, then return every audited id."""
    for _ in range(150):
        seen = audited_request_ids(server)
        if request_id in seen:
            return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{request_id} was never audited")


async def audit_marker(server: PacemakerServer, request_id: str) -> set[str]:
    """An ordinary audited request sent after the ones under test: once its row is in, theirs would be too."""
    async with server.client() as http:
        assert (await http.get("/v1/tools", headers={"X-Request-ID": request_id})).status_code == 200
    return await wait_until_audited(server, request_id)


def ws_url(server: PacemakerServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/ws"


# --- matching, unit by unit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://app.example.com:443", False),  # browsers never send a default port
        ("http://app.example.com", False),
        ("https://evil.app.example.com", False),
        ("https://app.example.com.evil.net", False),
        ("http://localhost", True),
        ("http://localhost:5173", True),
        ("http://localhost:5173.evil.net", False),
        ("https://localhost:5173", False),
        ("http://localhostx:5173", False),
        ("https://a.example.org:8443", True),
        ("https://a.b.example.org:8443", True),
        ("https://example.org:8443", False),  # *. needs a subdomain
        ("https://a.example.org", False),
        ("https://aexample.org:8443", False),
        ("null", False),
        ("", False),
    ],
)
def test_the_matcher_allows_exact_origins_and_patterns_only(origin: str, allowed: bool) -> None:
    matcher = OriginMatcher(ALLOWED)
    assert matcher.allows(origin.encode()) is allowed
    assert matcher.allows(origin.encode()) is allowed  # the cached answer too


def test_entries_are_normalised_as_browsers_send_origins() -> None:
    assert OriginMatcher(["HTTPS://App.Example.com:443"]).allows(b"https://app.example.com")
    assert OriginMatcher(["*"]).allows(b"https://anything.test:1234")
    assert not OriginMatcher(["*"]).allows(b"null")
    assert OriginMatcher([]).empty and not OriginMatcher([]).allows(b"http://localhost:3000")


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("https://app.example.com/", "no path"),
        ("app.example.com", "is not an origin"),
        ("null", "sandboxed"),
        ("http://localhost:0", "1 to 65535"),
        ("http://localhost:99999", "1 to 65535"),
        ("https://*example.com", "is not an origin"),
        ("https://a.*.example.com", "is not an origin"),
    ],
)
def test_entries_that_are_not_origins_are_refused_at_start(entry: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_origin_pattern(entry)
    with pytest.raises(ValueError, match=complaint):
        CorsSettings(allow_origins=[entry])


def test_the_default_methods_are_every_method_a_route_takes() -> None:
    schema = json.loads((ROOT / "openapi.json").read_text())
    taken = {method.upper() for operations in schema["paths"].values() for method in operations}
    assert taken <= set(CorsSettings().allow_methods)


def test_header_lists_take_names_not_patterns() -> None:
    with pytest.raises(ValueError, match="not a header name"):
        CorsSettings(expose_headers=["x-ratelimit-*"])
    assert CorsSettings(allow_headers=["*"]).allow_headers == ["*"]


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("http://127.0.0.1:5173", "127.0.0.1:8000", False),
        ("https://example.com", "example.com", True),  # TLS ended by a proxy that keeps Host
        ("http://example.com", "example.com:80", True),
        ("https://example.com", "example.com:8443", False),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://[::1]:8000", "[::1]:9000", False),
        ("http://evil.test", "example.com", False),
        ("http://example.com", None, False),
    ],
)
def test_same_origin_compares_host_and_port(origin: str, host: str | None, same: bool) -> None:
    assert same_origin(origin, host) is same


# --- HTTP, against a server ----------------------------------------------------------------------


async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(cors_server: PacemakerServer) -> None:
    async with httpx.AsyncClient(base_url=cors_server.base_url) as http:
        response = await http.options(
            "/v1/tasks", headers={**PREFLIGHT, "Origin": "http://localhost:5173", "X-Request-ID": "preflight-ok"}
        )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert response.headers["access-control-allow-methods"] == "GET, POST, DELETE"
    allowed_headers = {name.strip().lower() for name in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id", "x-request-id"} <= allowed_headers
    assert response.headers["access-control-max-age"] == "321"
    assert "Origin" in response.headers["vary"]
    assert "access-control-allow-credentials" not in response.headers  # keys are headers, never cookies
    assert response.headers["x-request-id"] == "preflight-ok"


async def test_a_preflight_from_another_origin_is_refused_with_403(cors_server: PacemakerServer) -> None:
    async with httpx.AsyncClient(base_url=cors_server.base_url) as http:
        response = await http.options(
            "/v1/tasks", headers={**PREFLIGHT, "Origin": "https://evil.test", "X-Request-ID": "preflight-refused"}
        )
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "origin_not_allowed"
    assert response.json()["request_id"] == "preflight-refused"
    assert "access-control-allow-origin" not in response.headers


async def test_preflights_are_never_audited(cors_server: PacemakerServer) -> None:
    async with httpx.AsyncClient(base_url=cors_server.base_url) as http:
        for request_id, origin in (("pf-audit-ok", "https://app.example.com"), ("pf-audit-no", "https://evil.test")):
            response = await http.options(
                "/v1/tasks", headers={**PREFLIGHT, "Origin": origin, "X-Request-ID": request_id}
            )
            assert response.status_code in (204, 403)
    audited = await audit_marker(cors_server, "pf-audit-marker")
    assert not {"pf-audit-ok", "pf-audit-no"} & audited


async def test_responses_to_an_allowed_origin_carry_the_cors_headers(cors_server: PacemakerServer) -> None:
    async with cors_server.client() as http:
        response = await http.post(
            "/v1/tasks", json={"query": "What is 2 + 3?"}, headers={"Origin": "https://app.example.com"}
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    assert response.headers["vary"] == "Origin"
    exposed = {name.strip() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after", "x-pacemaker-cost-usd", "x-ratelimit-remaining-requests"} <= exposed
    assert "x-request-id" in response.headers  # and it is one a page may read


async def test_refusals_reach_the_page_too(cors_server: PacemakerServer) -> None:
    """A page must be able to read a 401 or a 413 to tell its user why: they carry the headers too."""
    origin = {"Origin": "http://localhost:3000"}
    async with httpx.AsyncClient(base_url=cors_server.base_url) as http:
        unauthenticated = await http.post("/v1/tasks", json={"query": "x"}, headers=origin)
        too_large = await http.post(
            "/v1/tasks",
            content=b"{" + b" " * 2_000_000 + b"}",
            headers={**origin, "Authorization": f"Bearer {cors_server.key}", "Content-Type": "application/json"},
        )
    assert unauthenticated.status_code == 401 and too_large.status_code == 413
    for response in (unauthenticated, too_large):
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_other_origins_and_requests_without_origin_get_no_cors_headers(cors_server: PacemakerServer) -> None:
    async with cors_server.client() as http:
        foreign = await http.post("/v1/tasks", json={"query": "hello"}, headers={"Origin": "https://evil.test"})
        plain = await http.post("/v1/tasks", json={"query": "hello"})
    # Answered as usual: it is the browser that keeps a foreign page from reading the answer.
    assert foreign.status_code == plain.status_code == 200
    for response in (foreign, plain):
        assert not [name for name in response.headers if name.startswith("access-control-")]
        assert "vary" not in response.headers


async def test_by_default_no_origin_is_allowed_and_preflights_are_still_refused_unaudited(
    server: PacemakerServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        preflight = await http.options(
            "/v1/tasks", headers={**PREFLIGHT, "Origin": "http://localhost:5173", "X-Request-ID": "default-pf"}
        )
        not_a_preflight = await http.options("/v1/tasks")
        call = await http.get(
            "/v1/tools", headers={"Origin": "http://localhost:5173", "Authorization": f"Bearer {server.key}"}
        )
    assert preflight.status_code == 403 and preflight.json()["code"] == "origin_not_allowed"
    assert not_a_preflight.status_code == 405  # plain OPTIONS is routed as before
    assert call.status_code == 200 and "access-control-allow-origin" not in call.headers
    audited = await audit_marker(server, "default-pf-marker")
    assert "default-pf" not in audited


# --- the WebSocket handshake ---------------------------------------------------------------------


async def first_event(socket: websockets.ClientConnection) -> dict[str, Any]:
    await socket.send(json.dumps({"type": "task.create", "query": "hi"}))
    event: dict[str, Any] = json.loads(await socket.recv())
    return event


async def test_a_websocket_from_another_origin_is_refused_with_403_and_audited(cors_server: PacemakerServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            ws_url(cors_server),
            origin=websockets.Origin("https://evil.test"),
            subprotocols=[websockets.Subprotocol("pacemaker.bearer"), websockets.Subprotocol(cors_server.key)],
            additional_headers={"X-Request-ID": "ws-foreign-origin"},
        )
    response = refused.value.response
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert json.loads(response.body)["code"] == "origin_not_allowed"
    await wait_until_audited(cors_server, "ws-foreign-origin")
    with sqlite3.connect(cors_server.workdir / "pacemaker.db") as db:
        row = db.execute(
            "SELECT route, transport, status, error_code, http_status FROM audit_record WHERE request_id = ?",
            ("ws-foreign-origin",),
        ).fetchone()
    assert row == ("/v1/ws", "ws", "rejected", "origin_not_allowed", 403)


async def test_a_websocket_from_an_allowed_own_or_no_origin_is_served(cors_server: PacemakerServer) -> None:
    bearer = [websockets.Subprotocol("pacemaker.bearer"), websockets.Subprotocol(cors_server.key)]
    for origin in ("http://localhost:5173", cors_server.base_url, None):
        async with websockets.connect(
            ws_url(cors_server), origin=websockets.Origin(origin) if origin else None, subprotocols=bearer
        ) as socket:
            assert socket.subprotocol == "pacemaker.bearer"
            assert (await first_event(socket))["type"] == "task.started", origin


async def test_the_origin_is_checked_before_the_key(cors_server: PacemakerServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url(cors_server), origin=websockets.Origin("https://evil.test"))
    assert refused.value.response.status_code == 403  # not 401: a foreign page learns nothing about keys


def test_only_make_run_allows_local_dev_servers() -> None:
    """The default allows no other origin; `make run` (the development server) allows every local port."""
    assert CorsSettings().allow_origins == []
    dry_run = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    serve = next(line for line in dry_run.splitlines() if line.endswith("pacemaker serve"))
    assignment = shlex.split(serve)[0]
    name, _, value = assignment.partition("=")
    assert name == "PACEMAKER_SERVER__CORS__ALLOW_ORIGINS"
    matcher = OriginMatcher(CorsSettings(allow_origins=json.loads(value)).allow_origins)
    for dev_server in ("http://localhost:5173", "http://localhost:3000", "http://127.0.0.1:5173"):
        assert matcher.allows(dev_server.encode()), dev_server
    for other in ("https://localhost:5173", "http://example.com", "http://192.168.1.9:5173"):
        assert not matcher.allows(other.encode()), other
