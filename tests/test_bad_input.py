"""Bad input gets a 4xx application/problem+json with a stable code, never a 500."""

from __future__ import annotations

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
    assert_problem(await client.get("/v1/tasks"), 405, "method_not_allowed")


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
