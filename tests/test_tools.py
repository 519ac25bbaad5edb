"""Tools: allowlists per key and per task, and HTTP tools declared in configuration."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker

TOKEN = "s3cret-token"


def http_tool(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": f"the {name} tool", "url": url, "allow_private": True, **extra}


@pytest.fixture(scope="module")
def tooled(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("tools")
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    config = server_config(
        workdir,
        fake_upstream,
        tools={
            "http": [
                http_tool(
                    "weather",
                    f"{fake_upstream}/tools/echo",
                    method="GET",
                    parameters=city,
                    headers_from_env={"Authorization": "WEATHER_TOKEN"},
                ),
                http_tool("post_note", f"{fake_upstream}/tools/echo", method="POST"),
                http_tool("away", f"{fake_upstream}/tools/redirect?to=http://127.0.0.2:1/tools/echo", method="GET"),
                http_tool("home", f"{fake_upstream}/tools/redirect?to=/tools/echo", method="GET"),
                http_tool("big", f"{fake_upstream}/tools/big", method="GET", max_response_bytes=1000),
                http_tool("many", f"{fake_upstream}/tools/many", method="GET"),
                http_tool("down", f"{fake_upstream}/tools/fail", method="GET"),
                # A name, not a literal: a private literal without allow_private is refused at start.
                {
                    **http_tool(
                        "internal", f"{fake_upstream.replace('127.0.0.1', 'localhost')}/tools/echo", method="GET"
                    ),
                    "allow_private": False,
                },
            ]
        },
    )
    server = start_pacemaker(workdir, config, WEATHER_TOKEN=f"Bearer {TOKEN}")
    yield server
    server.process.stop()


def key_with(server: PacemakerServer, *args: str) -> str:
    created = json.loads(server.cli("keys", "create", "--name", uuid.uuid4().hex[:8], "--json", *args).stdout)
    key: str = created["key"]
    return key


async def test_an_http_tool_calls_only_its_url_with_validated_arguments_and_its_secret(
    tooled: PacemakerServer,
) -> None:
    async with tooled.client() as http:
        listed = {tool["name"]: tool for tool in (await http.get("/v1/tools")).json()}
        called = await http.post("/v1/tools/weather/invoke", json={"arguments": {"city": "Oslo"}})
        posted = await http.post("/v1/tools/post_note/invoke", json={"arguments": {"text": "hi", "n": 2}})
        invalid = await http.post("/v1/tools/weather/invoke", json={"arguments": {"town": "Oslo"}})
    assert listed["weather"]["parameters"]["required"] == ["city"]
    assert "WEATHER_TOKEN" not in json.dumps(listed) and TOKEN not in json.dumps(listed)
    result = called.json()["result"]
    assert result["status"] == 200
    assert result["body"] == {
        "method": "GET",
        "query": {"city": "Oslo"},
        "body": None,
        "authorization": f"Bearer {TOKEN}",
        "traceparent": None,  # tracing is off
        "x_request_id": called.headers["x-request-id"],  # the request's id goes along
    }
    assert posted.json()["result"]["body"]["body"] == {"text": "hi", "n": 2}
    assert invalid.status_code == 422 and "'city' is a required property" in invalid.json()["detail"]


async def test_redirects_stay_within_the_declared_origin(tooled: PacemakerServer) -> None:
    async with tooled.client() as http:
        away = (await http.post("/v1/tools/away/invoke", json={"arguments": {}})).json()
        home = (await http.post("/v1/tools/home/invoke", json={"arguments": {}})).json()
    assert away["result"] is None and "refused a redirect to another origin" in away["error"]
    assert home["error"] is None and home["result"]["body"]["method"] == "GET"


async def test_private_addresses_size_caps_and_backend_failures(tooled: PacemakerServer) -> None:
    async with tooled.client() as http:
        internal = (await http.post("/v1/tools/internal/invoke", json={"arguments": {}})).json()
        big = (await http.post("/v1/tools/big/invoke", json={"arguments": {}})).json()
        down = (await http.post("/v1/tools/down/invoke", json={"arguments": {}})).json()
    assert "resolves to the private address" in internal["error"]
    assert "response larger than 1000 bytes" in big["error"]
    assert "HTTP 503" in down["error"]


async def test_a_key_without_a_tool_cannot_invoke_it_and_its_model_is_never_offered_it(
    tooled: PacemakerServer, upstream_stats: Any
) -> None:
    key = key_with(tooled, "--tools", "weather")
    tag = uuid.uuid4().hex[:8]
    async with tooled.client(key=key) as http:
        listed = [tool["name"] for tool in (await http.get("/v1/tools")).json()]
        refused = await http.post("/v1/tools/calculator/invoke", json={"arguments": {"expression": "1+1"}})
        asked = await http.post("/v1/tasks", json={"query": "x", "tools": ["calculator"]})
        task = await http.post("/v1/tasks", json={"query": f"What is 2 + 2? #tag={tag}", "model": "fake-model"})
    assert listed == ["weather"]
    assert refused.status_code == 403 and refused.json()["code"] == "tool_not_allowed"
    assert asked.status_code == 403 and asked.json()["code"] == "tool_not_allowed"
    assert task.status_code == 200 and task.json()["tool_calls"] == []  # no calculator offered, so none called
    bodies = [b for b in (await upstream_stats.get("/_control/stats")).json()["last_bodies"] if tag in str(b)]
    offered = {t["function"]["name"] for body in bodies for t in body.get("tools", [])}
    assert offered == {"weather"}


async def test_a_task_allowlist_narrows_what_the_model_is_offered(tooled: PacemakerServer, upstream_stats: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    async with tooled.client() as http:
        body = {"query": f"What is 2 + 2? #tag={tag}", "model": "fake-model", "tools": ["calculator"], "stream": True}
        async with http.stream("POST", "/v1/tasks", json=body) as response:
            events = [e.json() async for e in read_sse(response)]
    assert [e["tool"] for e in events if e["type"] == "tool.call"] == ["calculator"]
    bodies = [b for b in (await upstream_stats.get("/_control/stats")).json()["last_bodies"] if tag in str(b)]
    assert {t["function"]["name"] for body in bodies for t in body.get("tools", [])} == {"calculator"}


async def test_a_large_answer_is_read_whole_not_cut_at_the_first_network_read(tooled: PacemakerServer) -> None:
    async with tooled.client() as http:
        called = (await http.post("/v1/tools/many/invoke", json={"arguments": {}})).json()
    assert called["error"] is None
    assert len(called["result"]["body"]["items"]) == 20_000
