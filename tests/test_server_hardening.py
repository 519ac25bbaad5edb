"""The server process's own defences: keys kept out of every log line, and the request-head timeout."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets
from uvicorn.logging import AccessFormatter
from websockets.typing import Subprotocol

from app.config import load_settings
from app.observability.logging import configure_logging
from tests.support import ROOT, PacemakerServer, free_port, server_config, start_pacemaker

HEADER_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 5.0  # uvicorn's default timeout_keep_alive, which Pacemaker keeps


def _config(workdir: Path, **overrides: Any) -> dict[str, Any]:
    # No sandbox: these servers never run code, and compiling its module would only slow them.
    return server_config(workdir, None, tools={"python": False}, **overrides)


# Keys kept out of logs ------------------------------------------------------------------------------


def _secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(24)


async def _expose_secrets(server: PacemakerServer) -> list[str]:
    """Present secrets every way a client might put them in a URL; the secrets it used."""
    ws_base = server.base_url.replace("http://", "ws://") + "/v1/ws"
    bogus, bogus_bearer, token, plain, access, mixed, encoded = (
        _secret("pk_bogus"),
        "pk_" + secrets.token_urlsafe(32),
        _secret("tok"),
        _secret("k"),
        _secret("at"),
        _secret("mx"),
        _secret("enc"),
    )
    async with await websockets.connect(f"{ws_base}?api_key={server.key}") as socket:
        await socket.ping()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{ws_base}?api_key={bogus}")
    assert refused.value.response.status_code == 401
    # In headers too, which the WebSocket library logs at DEBUG.
    async with await websockets.connect(ws_base, additional_headers={"X-API-Key": server.key}) as socket:
        await socket.ping()
    offered = [Subprotocol("pacemaker.bearer"), Subprotocol(bogus_bearer)]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_base, subprotocols=offered)
    assert refused.value.response.status_code == 401
    async with server.client() as http:
        answers = {
            f"/health/live?api_key={server.key}": 200,
            f"/v1/tools?token={token}": 200,
            f"/no-such-route?key={plain}": 404,
            f"/v1/models?ACCESS_TOKEN={access}": 200,
            f"/health/live?a=1&Api_Key={mixed}&b=2": 200,
            f"/health/live?api%5Fkey={encoded}": 200,  # the name percent-encoded: the app decodes it
            f"/v1/no-such/{server.key}": 404,  # a key pasted into the path
        }
        for path, status in answers.items():
            assert (await http.get(path)).status_code == status, path
    return [server.key, bogus, bogus_bearer, token, plain, access, mixed, encoded]


@pytest.mark.parametrize(
    "overrides",
    [
        {"server": {"access_log": True}},
        {"server": {"access_log": False}},
        {"server": {"access_log": True}, "log_json": True, "log_level": "DEBUG"},
    ],
    ids=["access-log", "no-access-log", "json-debug"],
)
async def test_no_key_or_token_reaches_any_log_line(tmp_path: Path, overrides: dict[str, Any]) -> None:
    server = start_pacemaker(tmp_path, _config(tmp_path, **overrides))
    try:
        used = await _expose_secrets(server)
    finally:
        server.process.stop()
    log = server.process.log_path.read_text(errors="replace")  # the whole of stdout and stderr
    for secret in used:
        assert secret not in log
        assert secret[4:] not in log  # not even with its first characters cut off
    # The lines are still there, redacted: the test cannot pass by logging nothing.
    assert "Application startup complete" in log
    assert log.count('"WebSocket /v1/ws?api_key=[redacted]"') == 2
    if overrides["server"]["access_log"]:
        assert '"GET /health/live?api_key=[redacted] HTTP/1.1" 200' in log
        assert '"GET /v1/tools?token=[redacted] HTTP/1.1" 200' in log
        assert '"GET /no-such-route?key=[redacted] HTTP/1.1" 404' in log
        assert '"GET /v1/models?ACCESS_TOKEN=[redacted] HTTP/1.1" 200' in log
        assert '"GET /health/live?a=1&Api_Key=[redacted]&b=2 HTTP/1.1" 200' in log
        assert '"GET /health/live?api%5Fkey=[redacted] HTTP/1.1" 200' in log
        assert '"GET /v1/no-such/pk_[redacted] HTTP/1.1" 404' in log
    else:
        assert '"GET ' not in log


def _record(msg: str, *args: object, exc: BaseException | None = None, name: str = "app.x") -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def _emit(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    from app.observability.logging import RedactingFilter  # here, so that the other tests run on older code

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    handler.handle(record)
    return stream.getvalue()


def test_the_filter_redacts_messages_arguments_and_exceptions_and_keeps_the_rest() -> None:
    key = "pk_" + secrets.token_urlsafe(32)
    plain = logging.Formatter("%(message)s")
    assert _emit(plain, _record("GET /x?api_key=%s&n=%d ok", key, 3)) == "GET /x?api_key=[redacted]&n=3 ok\n"
    assert _emit(plain, _record("call %s", f"/x?Token={key}")) == "call /x?Token=[redacted]\n"
    assert _emit(plain, _record("key %s was revoked", key)) == "key pk_[redacted] was revoked\n"
    assert _emit(plain, _record("%(url)s", {"url": f"/y?key=abc{key}"})) == "/y?key=[redacted]\n"
    # Neither other parameters nor look-alike names are touched.
    untouched = "/z?monkey=1&tokens=2&key_id=3 a=b"
    assert _emit(plain, _record(untouched)) == untouched + "\n"
    try:
        raise ValueError(f"upstream refused https://h/?access_token={key}")
    except ValueError as exc:
        failed = exc
    text = _emit(plain, _record("failed", exc=failed))
    assert key not in text and "access_token=[redacted]" in text and "Traceback" in text
    # uvicorn's access formatter unpacks the record's arguments: they must keep their shape.
    access = _emit(
        AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False),
        _record('%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", f"/v1/ws?api_key={key}", "1.1", 401),
    )
    assert access == '1.2.3.4:5 - "GET /v1/ws?api_key=[redacted] HTTP/1.1" 401 Unauthorized\n'


def test_the_app_handler_redacts_in_json_lines_too(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "pk_" + secrets.token_urlsafe(32)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("PACEMAKER_LOG_JSON", "true")
    logger = logging.getLogger("app")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        configure_logging(load_settings())
        try:
            raise RuntimeError(f"GET /v1/ws?api_key={key}")
        except RuntimeError:
            logging.getLogger("app.test").exception("socket ?token=%s failed", key)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    entry = json.loads(stream.getvalue())
    assert key not in stream.getvalue()
    assert entry["message"] == "socket ?token=[redacted] failed"
    assert "api_key=[redacted]" in entry["exception"]


# The request-head timeout ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("head-timeout")
    server = start_pacemaker(workdir, _config(workdir, server={"header_timeout_s": HEADER_TIMEOUT_S}))
    yield server
    server.process.stop()


def _port(server: PacemakerServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _head(path: str = "/health/live", *, close: bool = False, pad: int = 0) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: pacemaker"]
    if pad:
        lines.append("X-Pad: " + "a" * pad)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def _probe(port: int) -> int:
    """A normal request on a new connection: its status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_head(close=True))
        status, _ = await asyncio.wait_for(_read_response(reader), 5)
        return status
    finally:
        writer.close()


async def _trickle(port: int, give_up_after: float) -> tuple[float, bytes]:
    """Send a request head one byte every 0.5 s: how long the server kept the connection, and what it said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head = _head(pad=200)  # 240 bytes: two minutes at this pace
    try:
        for byte in head:
            if time.monotonic() - started > give_up_after:
                return float("inf"), b""
            try:
                writer.write(bytes([byte]))
                await writer.drain()
                said = await asyncio.wait_for(reader.read(4096), 0.5)
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - started, b""
            closed_at = time.monotonic() - started
            while said and not said.endswith(b"Request Timeout"):
                more = await reader.read(4096)
                if not more:
                    break
                said += more
            return closed_at, said
        raise AssertionError("the whole head was sent and answered: the test's head is too short")
    finally:
        writer.close()


async def test_connections_trickling_their_head_are_closed_while_others_are_served(timed: PacemakerServer) -> None:
    port = _port(timed)
    margin = 3.0  # a busy shared machine
    stop = asyncio.Event()
    statuses: list[int] = []

    async def keep_probing() -> None:
        while not stop.is_set():
            statuses.append(await _probe(port))
            await asyncio.sleep(0.2)

    prober = asyncio.create_task(keep_probing())
    try:
        results = await asyncio.gather(*(_trickle(port, HEADER_TIMEOUT_S + margin) for _ in range(50)))
    finally:
        stop.set()
        await prober
    held = sorted(seconds for seconds, _ in results)
    assert held[-1] <= HEADER_TIMEOUT_S + margin, f"still open after {HEADER_TIMEOUT_S + margin}s: {held}"
    assert held[0] >= HEADER_TIMEOUT_S - 0.6, f"closed before the timeout: {held}"
    answers = [said for _, said in results if said]
    assert answers, "no connection got an answer before the close"
    assert all(said.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for said in answers), answers[:3]
    assert all(b"connection: close\r\n" in said for said in answers)
    assert len(statuses) >= 5 and set(statuses) == {200}, statuses


async def test_a_slow_but_complete_head_within_the_timeout_is_answered(timed: PacemakerServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(timed))
    head = _head()
    try:
        for part in (head[:10], head[10:25], head[25:40], head[40:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(HEADER_TIMEOUT_S / 5)  # four pauses: 80% of the timeout in all
        status, body = await asyncio.wait_for(_read_response(reader), 5)
    finally:
        writer.close()
    assert status == 200 and json.loads(body) == {"status": "ok"}


async def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(timed: PacemakerServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(timed))
    started = time.monotonic()
    try:
        said = await asyncio.wait_for(reader.read(4096), HEADER_TIMEOUT_S + 3)
    finally:
        writer.close()
    # Closed without a 408, which a client could take for the answer to a request it is about to send.
    assert said == b""
    assert HEADER_TIMEOUT_S - 0.6 <= time.monotonic() - started <= HEADER_TIMEOUT_S + 3


async def test_an_idle_keep_alive_connection_still_follows_the_keep_alive_timeout(timed: PacemakerServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(timed))
    try:
        writer.write(_head())
        assert (await asyncio.wait_for(_read_response(reader), 5))[0] == 200
        # Idle for longer than the head timeout: the next request on the connection is still served.
        await asyncio.sleep(HEADER_TIMEOUT_S + 1)
        writer.write(_head())
        assert (await asyncio.wait_for(_read_response(reader), 5))[0] == 200
        idle_from = time.monotonic()
        said = await asyncio.wait_for(reader.read(4096), KEEP_ALIVE_S + 5)
        idle = time.monotonic() - idle_from
    finally:
        writer.close()
    assert said == b""  # closed by uvicorn's keep-alive timer, with no 408
    assert KEEP_ALIVE_S - 0.6 <= idle <= KEEP_ALIVE_S + 3


async def test_a_websocket_outlives_the_head_timeout(timed: PacemakerServer) -> None:
    url = timed.base_url.replace("http://", "ws://") + "/v1/ws"
    async with await websockets.connect(url, additional_headers={"Authorization": f"Bearer {timed.key}"}) as socket:
        await asyncio.sleep(HEADER_TIMEOUT_S + 1)
        await asyncio.wait_for(await socket.ping(), 5)
        await socket.send(json.dumps({"type": "task.create", "query": "still here?"}))
        assert json.loads(await socket.recv())["type"] == "task.started"


async def test_requests_on_a_kept_alive_connection_are_served_in_turn(timed: PacemakerServer) -> None:
    async with httpx.AsyncClient(base_url=timed.base_url) as http:
        for _ in range(20):
            assert (await http.get("/health/live")).status_code == 200


# Several workers ------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}


def test_several_workers_with_in_process_limits_are_refused() -> None:
    command = [sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(free_port())]
    # Its own session, so that workers a server without the check would start are stopped with it.
    process = subprocess.Popen(
        command, cwd=ROOT, env=_clean_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("serve --workers 2 started without limits.redis_url") from None
    assert process.returncode == 2, stderr
    assert "limits.redis_url" in stderr and "one worker per container" in stderr
    assert "Traceback" not in stderr


def test_several_workers_are_allowed_with_shared_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACEMAKER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PACEMAKER_LIMITS__REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("PACEMAKER_SERVER__METRICS", "false")  # with metrics on, one worker (test_operator_metrics.py)
    from app.server import uvicorn_options

    options = uvicorn_options(load_settings(), workers=2)
    assert options["workers"] == 2


@pytest.mark.parametrize("chunks", [1, 40])
async def test_a_request_head_over_the_size_limit_gets_431_and_the_server_does_not_grow(
    timed: PacemakerServer, chunks: int
) -> None:
    """uvicorn takes a head of any size (200 MB of headers grew a server by 300 MB); past max_header_bytes: 431.

    Sent in one write and in many, since a head that spans reads is parsed piece by piece.
    """
    process = psutil.Process(timed.process.process.pid)
    before = process.memory_info().rss
    head = b"GET /health/live HTTP/1.1\r\nHost: pacemaker\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (n, b"a" * 4000) for n in range(50)
    )  # 200 kB, the default limit is 64 KiB
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(timed))
    try:
        step = len(head) // chunks + 1
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(head), step):
                writer.write(head[start : start + step])
                await writer.drain()
        said = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert said.startswith(b"HTTP/1.1 431 "), said[:200]
    assert b"connection: close\r\n" in said
    assert await _probe(_port(timed)) == 200
    assert process.memory_info().rss - before < 20 * 1024 * 1024
