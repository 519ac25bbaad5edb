"""The audit middleware submits a request's row once, before the response's last byte goes out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from app.audit.middleware import AuditMiddleware


class RecordingSink:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def submit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


async def serve(app: Any, sink: RecordingSink) -> list[tuple[str, bool, int]]:
    """What the server was sent: (type, more_body, rows submitted by then) per message."""
    sent: list[tuple[str, bool, int]] = []

    async def send(message: Message) -> None:
        sent.append((message["type"], message.get("more_body", False), len(sink.rows)))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "path": "/v1/tools/calculator/invoke",
        "headers": [(b"user-agent", b"test")],
        "client": ("127.0.0.1", 5000),
        "state": {"request_id": "rid-1", "resources": SimpleNamespace(audit=sink)},
    }
    await AuditMiddleware(app)(scope, receive, send)
    return sent


def responder(*chunks: bytes, fail_after: bool = False) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = Route("/v1/tools/{name}/invoke", endpoint=lambda request: None)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for number, chunk in enumerate(chunks, 1):
            await send({"type": "http.response.body", "body": chunk, "more_body": number < len(chunks)})
        if fail_after:
            raise RuntimeError("after the response")

    return app


async def test_the_row_is_submitted_before_the_last_body_message_and_only_once() -> None:
    sink = RecordingSink()
    sent = await serve(responder(b"a", b"b", b"c"), sink)
    assert sent == [
        ("http.response.start", False, 0),
        ("http.response.body", True, 0),
        ("http.response.body", True, 0),
        ("http.response.body", False, 1),  # the row was journaled before this went on
    ]
    [row] = sink.rows
    assert row["route"] == "/v1/tools/{name}/invoke" and row["http_status"] == 200 and row["request_id"] == "rid-1"


async def test_a_failure_after_the_response_does_not_submit_twice() -> None:
    sink = RecordingSink()
    with pytest.raises(RuntimeError):
        await serve(responder(b"done", fail_after=True), sink)
    assert len(sink.rows) == 1 and sink.rows[0]["status"] == "completed"


async def test_a_request_without_a_complete_response_still_leaves_one_row() -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("before any response")

    async def client_left(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})

    failed, left = RecordingSink(), RecordingSink()
    with pytest.raises(RuntimeError):
        await serve(fails, failed)
    await serve(client_left, left)
    assert [(r["http_status"], r["status"], r["route"]) for r in failed.rows] == [
        (500, "failed", "/v1/tools/calculator/invoke")
    ]
    assert len(left.rows) == 1
