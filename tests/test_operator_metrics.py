"""The metrics operators expect: time to first token, tool and upstream durations, process metrics, one worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import ConfigError, load_settings
from tests.support import ROOT, PacemakerServer, free_port, server_config, start_pacemaker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_time_to_first_token_is_per_model_and_counts_streamed_calls_only(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        assert (await streamed.aread()).endswith(b"data: [DONE]\n\n")
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert (
        await client.post("/v1/tasks", json={"query": "hi", "model": "sim-small", "stream": True})
    ).status_code == 200
    after = await scrape(client)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The streamed completion and the streamed task; a whole body at once says nothing of a first token.
    assert added("pacemaker_llm_time_to_first_token_seconds_count", model="fake-model") == 1
    assert added("pacemaker_llm_time_to_first_token_seconds_count", model="sim-small") == 1
    first_token = added("pacemaker_llm_time_to_first_token_seconds_sum", model="fake-model")
    assert 0 < first_token <= added("pacemaker_llm_call_seconds_sum", model="fake-model")
    # Each request to a provider, by provider.
    assert added("pacemaker_upstream_request_duration_seconds_count", provider="fake") == 2
    assert added("pacemaker_upstream_request_duration_seconds_count", provider="simulated") == 1


async def test_tool_call_duration_is_per_tool_and_only_for_calls_that_ran(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    ran = await client.post("/v1/tools/calculator/invoke", json={"arguments": {"expression": "2 ** 10"}})
    invalid = await client.post("/v1/tools/calculator/invoke", json={"arguments": {"nope": 1}})
    after = await scrape(client)
    assert ran.status_code == 200 and invalid.status_code == 422
    name = "pacemaker_tool_call_duration_seconds_count"
    assert value(after, name, tool="calculator") - value(before, name, tool="calculator") == 1


async def test_process_metrics_are_exported_and_no_created_series(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    samples = await scrape(client)
    assert value(samples, "process_resident_memory_bytes") > 10_000_000
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "python_gc_collections_total", generation="0") > 0
    # prometheus_client would add a <name>_created series to every counter and histogram.
    assert "_created" not in response.text


async def test_metrics_can_be_turned_off(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("no-metrics")
    server: PacemakerServer = start_pacemaker(workdir, server_config(workdir, None, server={"metrics": False}))
    try:
        async with server.client() as http:
            response = await http.get("/metrics")
            assert (await http.get("/health")).status_code == 200
    finally:
        server.process.stop()
    assert response.status_code == 404 and response.json()["code"] == "not_found"


def _serve_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}, **extra}


def test_several_workers_are_refused_while_metrics_are_on_even_with_shared_limits() -> None:
    """Each scrape would reach one worker and get its figures only; one worker per container instead."""
    env = _serve_env(PACEMAKER_LIMITS__REDIS_URL="redis://127.0.0.1:6379/0")
    command = [sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(free_port())]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("serve --workers 2 started with metrics on") from None
    assert process.returncode == 2, stderr
    assert "one worker per container" in stderr and "server.metrics: false" in stderr
    assert "Traceback" not in stderr


def test_several_workers_are_allowed_with_shared_limits_and_metrics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACEMAKER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PACEMAKER_LIMITS__REDIS_URL", "redis://127.0.0.1:6379/0")
    from app.server import uvicorn_options

    with pytest.raises(ConfigError, match="one worker per container"):
        uvicorn_options(load_settings(), workers=2)
    monkeypatch.setenv("PACEMAKER_SERVER__METRICS", "false")
    assert uvicorn_options(load_settings(), workers=2)["workers"] == 2
    assert uvicorn_options(load_settings(), workers=1)["workers"] == 1
