"""The server process's own defences: keys kept out of every log line."""

from __future__ import annotations

import io
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import websockets
from uvicorn.logging import AccessFormatter
from websockets.typing import Subprotocol

from app.config import load_settings
from app.observability.logging import configure_logging
from tests.support import PacemakerServer, server_config, start_pacemaker


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
