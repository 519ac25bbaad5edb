"""POST /v1/chat/completions and POST /v1/tasks on the fast path answer as the whole stack does: statuses,
headers, bodies, audit rows and HTTP metrics, compared request by request with a server that has the fast
path off."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import PacemakerServer, server_config, start_pacemaker

ROWS_WITHIN_S = 15.0
# Headers whose values differ from one response to the next by nature.
VARYING = {"date", "x-request-id", "content-length", "server"}
ROW_FIELDS = (
    "route",
    "transport",
    "status",
    "error_code",
    "http_status",
    "model",
    "provider",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "user_agent",
    "client_ip",
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[dict[str, PacemakerServer]]:
    started: dict[str, PacemakerServer] = {}
    try:
        for name, on in (("fast", True), ("stack", False)):
            workdir = tmp_path_factory.mktemp(f"pacemaker-{name}")
            config = server_config(
                workdir, fake_upstream, breakers={"min_calls": 1_000_000}, retries={"max_retries": 0}
            )
            config["server"]["chat_fast_path"] = config["server"]["tasks_fast_path"] = on
            started[name] = start_pacemaker(workdir, config)
        yield started
    finally:
        for server in started.values():
            server.process.stop()


CHAT = "/v1/chat/completions"
TASKS = "/v1/tasks"


def _requests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"chat {label}", {"path": CHAT, **kwargs}) for label, kwargs in _chat_requests()] + [
        (f"task {label}", {"path": TASKS, **kwargs}) for label, kwargs in _task_requests()
    ]


def _task_requests() -> list[tuple[str, dict[str, Any]]]:
    good = {"query": "Say something", "model": "fake-model"}
    raw = json.dumps(good).encode()
    return [
        ("result", {"json": good}),
        ("simulated", {"json": {"query": "What is 17 * 23 + 4?"}}),
        ("streamed", {"json": {**good, "stream": True}}),
        ("streamed by Accept", {"json": good, "headers": {"Accept": "text/event-stream"}}),
        ("background", {"json": {**good, "background": True}}),
        ("idempotent", {"json": good, "headers": {"Idempotency-Key": f"parity-{uuid.uuid4().hex}"}}),
        ("idempotent stream", {"json": {**good, "stream": True}, "headers": {"Idempotency-Key": "parity-stream"}}),
        ("no key", {"json": good, "headers": {"Authorization": ""}}),
        ("bad key", {"json": good, "headers": {"Authorization": "Bearer pm_nope"}}),
        ("malformed", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("invalid", {"json": {"model": "fake-model"}}),
        ("unknown model", {"json": {**good, "model": "no-such-model"}}),
        ("too large", {"content": b" " * 1_100_000 + raw, "headers": {"Content-Type": "application/json"}}),
        (
            "too large chunked",
            {"content": _chunked(b" " * 1_100_000 + raw), "headers": {"Content-Type": "application/json"}},
        ),
        ("upstream fails", {"json": {**good, "query": "boom #status=500"}}),
        ("upstream fails streamed", {"json": {**good, "query": "boom #status=503", "stream": True}}),
    ]


def _chat_requests() -> list[tuple[str, dict[str, Any]]]:
    good = {"model": "fake-model", "messages": [{"role": "user", "content": "Say something"}]}
    raw = json.dumps(good).encode()
    return [
        ("completion", {"json": good}),
        ("simulated", {"json": {**good, "model": "sim-small"}}),
        ("no key", {"json": good, "headers": {"Authorization": ""}}),
        ("bad key", {"json": good, "headers": {"Authorization": "Bearer pm_nope"}}),
        ("malformed", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("invalid", {"json": {"model": "fake-model", "messages": []}}),
        ("unknown model", {"json": {**good, "model": "no-such-model"}}),
        ("too large", {"content": b" " * 1_100_000 + raw, "headers": {"Content-Type": "application/json"}}),
        (
            "too large chunked",
            {"content": _chunked(b" " * 1_100_000 + raw), "headers": {"Content-Type": "application/json"}},
        ),
        ("streamed", {"json": {**good, "stream": True}}),
        ("upstream fails", {"json": {**good, "messages": [{"role": "user", "content": "#status=500"}]}}),
    ]


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length (httpx sends it chunked): the limit applies while it comes in."""
    for start in range(0, len(data), 65_536):
        yield data[start : start + 65_536]


def _shape(value: Any) -> Any:
    """The JSON's structure and stable values: ids, times and free text left out."""
    varying = ("id", "created", "request_id", "message", "created_at", "started_at", "duration_ms", "task_id")
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in varying}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


async def _send(server: PacemakerServer, label: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    request_id = f"fast-{label.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
    headers = {"X-Request-ID": request_id, "User-Agent": "parity-test", **kwargs.pop("headers", {})}
    path = kwargs.pop("path")
    async with server.client() as http:
        response = await http.post(path, headers=headers, **kwargs)
    body: Any = response.text
    if response.headers.get("content-type", "").startswith(("application/json", "application/problem+json")):
        body = _shape(response.json())
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        body = [line.split(":", 1)[0] for line in response.text.splitlines() if line]  # the events' fields
    return {
        "request_id": response.headers.get("x-request-id"),
        "status": response.status_code,
        "headers": sorted(k for k in response.headers if k not in VARYING),
        "content_type": response.headers.get("content-type"),
        "body": body,
        "sent_id": request_id,
    }


def _rows(database: Path, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(database) as connection:
        connection.row_factory = sqlite3.Row
        found = connection.execute("SELECT * FROM audit_record")
        return {row["request_id"]: dict(row) for row in found if row["request_id"] in request_ids}


async def _wait_for_rows(server: PacemakerServer, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + ROWS_WITHIN_S
    while True:
        rows = _rows(server.workdir / "pacemaker.db", request_ids)
        if len(rows) == len(request_ids) or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.1)


def _route_metrics(text: str) -> dict[str, float]:
    lines = {}
    for line in text.splitlines():
        if line.startswith("pacemaker_http_requests_total{") and (
            f'handler="{CHAT}"' in line or f'handler="{TASKS}"' in line
        ):
            name, value = line.rsplit(" ", 1)
            lines[name] = float(value)
    return lines


async def test_fast_path_answers_audits_and_counts_as_the_whole_stack(servers: dict[str, PacemakerServer]) -> None:
    answers: dict[str, list[dict[str, Any]]] = {}
    before = {}
    for name, server in servers.items():
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            before[name] = _route_metrics((await http.get("/metrics")).text)
        answers[name] = [await _send(server, label, dict(kwargs)) for label, kwargs in _requests()]

    for (label, _kwargs), fast, stack in zip(_requests(), answers["fast"], answers["stack"], strict=True):
        assert fast["request_id"] == fast["sent_id"], label  # the client's id, echoed
        for field in ("status", "headers", "content_type", "body"):
            assert fast[field] == stack[field], (label, field, fast[field], stack[field])

    rows = {
        name: await _wait_for_rows(server, {answer["sent_id"] for answer in answers[name]})
        for name, server in servers.items()
    }
    for (label, _kwargs), fast, stack in zip(_requests(), answers["fast"], answers["stack"], strict=True):
        fast_row, stack_row = rows["fast"].get(fast["sent_id"]), rows["stack"].get(stack["sent_id"])
        assert fast_row is not None and stack_row is not None, label
        assert {f: fast_row[f] for f in ROW_FIELDS} == {f: stack_row[f] for f in ROW_FIELDS}, label
        assert (fast_row["api_key_id"] is None) == (stack_row["api_key_id"] is None), label
        assert fast_row["cost_usd"] == stack_row["cost_usd"], label

    for name, server in servers.items():
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            after = _route_metrics((await http.get("/metrics")).text)
        grown = {series: value - before[name].get(series, 0.0) for series, value in after.items()}
        before[name] = {series: value for series, value in grown.items() if value}
    assert before["fast"] == before["stack"]


async def test_an_address_over_the_edge_limit_is_refused_unless_its_key_is_known(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: str
) -> None:
    """The fast path counts the chat route at the edge as the middleware does, and reads the presented key
    (Authorization or X-API-Key) from the headers it scanned itself."""
    workdir = tmp_path_factory.mktemp("pacemaker-edge")
    config = server_config(workdir, fake_upstream, breakers={"min_calls": 1_000_000}, retries={"max_retries": 0})
    config["server"]["edge"] = {"rate": "3/minute", "failed_auth": "10000/minute"}
    server = start_pacemaker(workdir, config)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Say something"}]}
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            good = {"Authorization": f"Bearer {server.key}"}
            statuses = [
                (await http.post("/v1/chat/completions", json=body, headers=good)).status_code for _ in range(3)
            ]
            assert statuses == [200, 200, 200]
            unknown = await http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer pk_nope"})
            assert unknown.status_code == 429
            assert unknown.headers["content-type"] == "application/problem+json"
            assert unknown.headers.get("retry-after") and unknown.headers.get("x-request-id")
            known = await http.post("/v1/chat/completions", json=body, headers=good)
            assert known.status_code == 200  # known good here: served from the blocked address
            by_x_api_key = await http.post("/v1/chat/completions", json=body, headers={"X-API-Key": server.key})
            assert by_x_api_key.status_code == 200
            nothing = await http.post("/v1/chat/completions", json=body)
            assert nothing.status_code == 429
    finally:
        server.process.stop()
