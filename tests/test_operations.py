"""Health, readiness, metrics and the committed OpenAPI schema."""

from __future__ import annotations

import json

import httpx

from app.config import load_settings
from app.main import create_app
from tests.support import ROOT


async def test_health_reports_state_and_traffic(client: httpx.AsyncClient) -> None:
    first = (await client.get("/health")).json()
    second = (await client.get("/health")).json()
    assert first["status"] == "ok"
    assert first["version"]
    assert first["uptime_seconds"] > 0
    assert first["active_requests"] >= 1  # this request
    assert second["total_requests"] > first["total_requests"]


async def test_liveness_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "audit": "ok", "breakers": "ok", "load": "ok"},
    }


async def test_metrics_count_requests_by_route_template_and_tokens_by_model(client: httpx.AsyncClient) -> None:
    await client.post("/v1/tasks", json={"query": "count me"})
    await client.get("/v1/tasks-nope")
    text = (await client.get("/metrics")).text
    assert 'http_requests_total{handler="/v1/tasks",method="POST",status="2xx"}' in text
    assert 'handler="/v1/tasks-nope"' not in text  # unmatched paths never become labels
    assert "http_request_duration_seconds_bucket" in text
    assert 'pacemaker_tokens_total{kind="completion",model="sim-small"}' in text
    assert 'pacemaker_tasks_total{outcome="completed",transport="json"}' in text
    assert "pacemaker_active_streams" in text


def test_committed_openapi_matches_the_live_schema() -> None:
    committed = json.loads((ROOT / "openapi.json").read_text())
    live = json.loads(json.dumps(create_app(load_settings()).openapi()))
    assert committed == live, "openapi.json is stale: run `make openapi`"
