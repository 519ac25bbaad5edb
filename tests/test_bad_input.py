"""Bad input gets a 4xx application/problem+json with a stable code, never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support import PacemakerServer

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code", "request_id", "retryable"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert set(problem) >= PROBLEM_FIELDS
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["request_id"] == response.headers["x-request-id"]
    return problem


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"query": ""}, "invalid_request", "query"),
        ({"query": "   "}, "invalid_request", "query"),
        ({}, "invalid_request", "query"),
        ({"query": 42}, "invalid_request", "query"),
        ({"query": "x", "mode": "turbo"}, "invalid_request", "mode"),
        ({"query": "x", "model_tier": "huge"}, "invalid_request", "model_tier"),
        ({"query": "x", "max_tokens": 0}, "invalid_request", "max_tokens"),
        ({"query": "x", "max_tokens": "many"}, "invalid_request", "max_tokens"),
        ({"query": "x", "temperature": 9}, "invalid_request", "temperature"),
        ({"query": "x", "timeout_s": -1}, "invalid_request", "timeout_s"),
        ({"query": "x", "tools": "calculator"}, "invalid_request", "tools"),
        ({"query": "x", "stream": "maybe"}, "invalid_request", "stream"),
        ({"query": "x", "surprise": True}, "invalid_request", "surprise"),
        (["query"], "invalid_request", "body"),
    ],
)
async def test_invalid_task_bodies_are_422_naming_the_field(
    client: httpx.AsyncClient, body: Any, code: str, field: str
) -> None:
    problem = assert_problem(await client.post("/v1/tasks", json=body), 422, code)
    assert any(field in error["loc"] for error in problem["errors"]), problem


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": "x", "model": "no-such-model"}, 404, "model_not_found"),
        ({"query": "x", "context": {"model_tier": "gigantic"}}, 422, "invalid_request"),
        ({"query": "x", "tools": ["calculator", "rm-rf"]}, 422, "invalid_request"),
        ({"query": "x", "max_tokens": 10_000_000}, 422, "invalid_request"),
    ],
)
async def test_requests_that_cannot_run_are_refused_before_any_model_call(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, code: str
) -> None:
    assert_problem(await client.post("/v1/tasks", json=body), status, code)


async def test_malformed_json_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/tasks", content=b'{"query": "unterminated', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400, "malformed_json")


async def test_a_body_over_the_limit_is_a_413(client: httpx.AsyncClient) -> None:
    huge = {"query": "x" * 1_100_000}
    assert_problem(await client.post("/v1/tasks", json=huge), 413, "payload_too_large")


async def test_a_chunked_body_over_the_limit_is_a_413_too(client: httpx.AsyncClient) -> None:
    async def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(20):
            yield b"x" * 100_000

    response = await client.post("/v1/tasks", content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "payload_too_large")


async def test_unknown_route_and_wrong_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(await client.delete("/v1/tasks"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer pk_wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-API-Key": "pk_wrong"},
    ],
)
async def test_missing_or_invalid_keys_are_401(server: PacemakerServer, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as anonymous:
        response = await anonymous.post("/v1/tasks", json={"query": "x"})
    problem = assert_problem(response, 401, "invalid_api_key")
    assert problem["retryable"] is False
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_x_api_key_header_is_accepted(server: PacemakerServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, headers={"X-API-Key": server.key}) as keyed:
        response = await keyed.post("/v1/tasks", json={"query": "via x-api-key"})
    assert response.status_code == 200


async def test_every_v1_route_in_the_schema_refuses_a_request_without_a_key(server: PacemakerServer) -> None:
    """What app/openapi.py declares: every /v1 operation needs an API key."""
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        schema = (await anonymous.get("/openapi.json")).json()
        for path, operations in schema["paths"].items():
            if not path.startswith("/v1/"):
                continue
            for method in operations:
                response = await anonymous.request(method, path.replace("{name}", "calculator"), json={})
                assert response.status_code == 401, (method, path, response.status_code)
                assert operations[method]["security"] == [{"BearerAuth": []}, {"ApiKeyAuth": []}]


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("depth", [65, 300, 600, 900, 2000])
async def test_a_context_nested_too_deep_is_a_422_not_a_500(client: httpx.AsyncClient, depth: int) -> None:
    """orjson writes at most 255 levels: a deeper context once broke the response and the audit row."""
    body = b'{"query": "x", "context": ' + b'{"a": ' * depth + b'"deep"' + b"}" * depth + b"}"
    response = await client.post("/v1/tasks", content=body, headers={"Content-Type": "application/json"})
    problem = assert_problem(response, 422, "invalid_request")
    assert "nested more than 64 levels" in problem["detail"]


async def test_a_context_within_the_nesting_limit_runs(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/tasks", json={"query": "hi", "context": nested(60)})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"query": "x", "tools": ["\\ud800"]}',  # a lone surrogate: no JSON encoder can write it back
        b'{"query": "\xff\xfe"}',  # not UTF-8
        b'{"query": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # past Python's 4,300-digit int limit
        b'{"query": "x", "temperature": NaN}',
        b'{"query": "x", "temperature": 1e400}',
    ],
)
async def test_bodies_json_cannot_carry_are_400_malformed_json(client: httpx.AsyncClient, raw: bytes) -> None:
    for path in ("/v1/tasks", "/v1/tools/calculator/invoke", "/v1/chat/completions"):
        response = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
        if path == "/v1/chat/completions":
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["code"] == "malformed_json"
        else:
            assert_problem(response, 400, "malformed_json")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff" * 40,
        b"[" * 1000 + b"]" * 1000,
        b'{"query": ' + b"1" * 5000 + b"}",
        b'{"query": "x", "context": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}",
    ],
)
async def test_a_caller_without_a_key_gets_401_whatever_body_it_sends(server: PacemakerServer, raw: bytes) -> None:
    """Authentication comes first: a bad body never tells an anonymous caller anything but 401."""
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        for path in ("/v1/tasks", "/v1/tools/calculator/invoke", "/v1/chat/completions"):
            response = await anonymous.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 401, (path, response.text)


async def test_usage_and_audit_date_filters_at_the_limits_are_answered_not_500(server: PacemakerServer) -> None:
    admin_key = json.loads(server.cli("keys", "create", "--name", "dates-admin", "--admin", "--json").stdout)["key"]
    async with server.client(admin_key) as admin:
        for params in (
            {"until": "9999-12-31"},
            {"since": "0001-01-01"},
            {"since": "0001-01-01", "until": "9999-12-31"},
        ):
            response = await admin.get("/v1/usage", params=params)
            assert response.status_code == 200, (params, response.text)
        for params in (
            {"until": "9999-12-31T23:59:59"},
            {"since": "0001-01-01T00:00:00"},
            {"until": "9999-12-31T23:59:59+00:00"},
        ):
            response = await admin.get("/v1/audit", params=params)
            assert response.status_code == 200, (params, response.text)
        for params in ({"since": "0001-01-01T00:00:00+14:00"}, {"until": "9999-12-31T23:59:59-14:00"}):
            assert_problem(await admin.get("/v1/audit", params=params), 422, "invalid_request")


async def test_a_nul_in_an_audit_filter_is_a_422(server: PacemakerServer) -> None:
    admin_key = json.loads(server.cli("keys", "create", "--name", "nul-admin", "--admin", "--json").stdout)["key"]
    async with server.client(admin_key) as admin:
        assert_problem(await admin.get("/v1/audit", params={"model": "a\x00b"}), 422, "invalid_request")


async def test_a_path_with_a_nul_is_a_404_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/%00"), 404, "not_found")
