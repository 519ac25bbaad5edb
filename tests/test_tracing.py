"""OpenTelemetry tracing: a real server exporting to a real OTLP/HTTP receiver process, and the off switch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from app.config import ConfigError, load_settings
from app.observability import tracing
from tests.support import (
    ManagedProcess,
    PacemakerServer,
    RedisServer,
    free_port,
    server_config,
    start_fake_upstream,
    start_pacemaker,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
SERVER, CLIENT = 2, 3  # OTLP span kinds
STATUS_ERROR = 2


class Traced:
    def __init__(self, server: PacemakerServer, receiver: str, upstream: str) -> None:
        self.server, self.receiver, self.upstream = server, receiver, upstream

    async def spans(self, until: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The spans received so far, once `until(spans)` holds (or the timeout: then the assertion says why)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.receiver) as http:
            while True:
                spans: list[dict[str, Any]] = (await http.get("/_control/spans")).json()
                if until(spans) or time.monotonic() > deadline:
                    return spans
                await asyncio.sleep(0.1)

    async def upstream_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.upstream) as http:
            stats: dict[str, Any] = (await http.get("/_control/stats")).json()
            return stats


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    workdir = tmp_path_factory.mktemp("tracing")
    upstream_process, upstream = start_fake_upstream(workdir)
    port = free_port()
    receiver_process = ManagedProcess(
        [sys.executable, "-m", "tests.fakes.otlp_receiver", "--port", str(port)], os.environ, workdir / "receiver.log"
    )
    redis = RedisServer(workdir)  # limiter spans are for the shared limiter
    server = None
    try:
        receiver_process.wait_for_port(port)
        redis.start()
        config = server_config(
            workdir,
            upstream,
            limits={"redis_url": redis.url},
            tools={
                "http": [
                    {
                        "name": "echo",
                        "description": "says back what it was sent",
                        "url": f"{upstream}/tools/echo",
                        "allow_private": True,
                    }
                ]
            },
        )
        server = start_pacemaker(
            workdir,
            config,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
            OTEL_SERVICE_NAME="pacemaker-test",
            OTEL_TRACES_SAMPLER="parentbased_always_on",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        yield Traced(server, f"http://127.0.0.1:{port}", upstream)
    finally:
        if server is not None:
            server.process.stop()
        redis.kill()
        receiver_process.stop()
        upstream_process.stop()


def _by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == name]


async def test_a_task_with_a_tool_call_is_one_trace_continued_from_the_caller_and_passed_on(traced: Traced) -> None:
    async with traced.server.client() as http:
        response = await http.post(
            "/v1/tasks",
            json={"query": "Use the tool. #tool=echo", "model": "fake-model"},
            headers={"traceparent": TRACEPARENT},
        )
    assert response.status_code == 200, response.text
    task = response.json()
    request_id = response.headers["x-request-id"]

    def complete(spans: list[dict[str, Any]]) -> bool:
        mine = [span for span in spans if span["trace_id"] == TRACE_ID]
        return (
            any(span["name"] == "POST /v1/tasks" for span in mine)
            and len(_by_name(mine, "chat fake-upstream-model")) == 2
        )

    spans = [span for span in await traced.spans(complete) if span["trace_id"] == TRACE_ID]
    names = sorted(span["name"] for span in spans)
    (request,) = _by_name(spans, "POST /v1/tasks")
    (agent,) = _by_name(spans, "invoke_agent pacemaker")
    chats = _by_name(spans, "chat fake-upstream-model")
    (tool,) = _by_name(spans, "execute_tool echo")
    assert len(chats) == 2, names

    # The caller's trace is continued: the request span's parent is the caller's span.
    assert request["parent_span_id"] == CALLER_SPAN and request["kind"] == SERVER
    assert request["service"] == "pacemaker-test"
    assert request["attributes"]["http.route"] == "/v1/tasks"
    assert request["attributes"]["http.response.status_code"] == 200
    assert request["attributes"]["pacemaker.request_id"] == request_id

    assert agent["parent_span_id"] == request["span_id"]
    assert agent["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert agent["attributes"]["gen_ai.provider.name"] == "fake"
    assert agent["attributes"]["gen_ai.request.model"] == "fake-model"
    assert agent["attributes"]["gen_ai.agent.id"] == task["id"]
    usage = task["usage"]
    assert agent["attributes"]["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert agent["attributes"]["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

    for chat in chats:
        attributes = chat["attributes"]
        assert chat["parent_span_id"] == agent["span_id"] and chat["kind"] == CLIENT
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "fake"
        assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "fake-upstream-model"
        assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    first, second = sorted(chats, key=lambda span: span["start_ns"])
    assert first["attributes"]["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert second["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]
    assert sum(chat["attributes"]["gen_ai.usage.input_tokens"] for chat in chats) == usage["prompt_tokens"]

    assert tool["parent_span_id"] == agent["span_id"]
    assert tool["attributes"]["gen_ai.operation.name"] == "execute_tool"
    assert tool["attributes"]["gen_ai.tool.name"] == "echo"
    assert tool["status"]["code"] != STATUS_ERROR

    # The shared limiter's calls are children of the task: the admission, and each model call's settlement.
    limiter = [span for span in spans if span["name"].startswith("limiter ")]
    assert {span["name"] for span in limiter} >= {"limiter admit", "limiter settle"}
    assert all(span["parent_span_id"] == agent["span_id"] for span in limiter)
    assert all(span["attributes"]["pacemaker.limiter.backend"] == "redis" for span in limiter)

    # The upstream got each model call's traceparent (same trace, the chat span as parent) and the request id.
    sent = (await traced.upstream_stats())["last_trace_headers"][-2:]
    assert [headers["traceparent"] for headers in sent] == [
        f"00-{TRACE_ID}-{chat['span_id']}-01" for chat in (first, second)
    ]
    assert {headers["x-request-id"] for headers in sent} == {request_id}
    # So did the HTTP tool, with the tool call's span as parent.
    echoed = task["tool_calls"][0]["result"]["body"]
    assert echoed["traceparent"] == f"00-{TRACE_ID}-{tool['span_id']}-01"
    assert echoed["x_request_id"] == request_id

    # The trace id is in the audit row and the task record.
    assert _wait_for_row(traced.server.workdir, "SELECT trace_id FROM audit_record WHERE task_id = ?", task["id"]) == (
        TRACE_ID,
    )
    assert _wait_for_row(traced.server.workdir, "SELECT trace_id FROM task WHERE id = ?", task["id"]) == (TRACE_ID,)
    # And in the task resource, so that a client can find the trace of a task it reads back.
    async with traced.server.client() as http:
        resource = (await http.get(f"/v1/tasks/{task['id']}")).json()
    assert resource["trace_id"] == TRACE_ID

    # Audit batches have spans of their own (a batch serves many requests: each is a trace root).
    batches = await traced.spans(lambda all_spans: bool(_by_name(all_spans, "audit batch")))
    batch = _by_name(batches, "audit batch")[0]
    assert batch["parent_span_id"] == "" and batch["attributes"]["db.operation.batch.size"] >= 1
    assert batch["attributes"]["db.collection.name"] == "audit_record"


def _wait_for_row(workdir: Path, sql: str, *parameters: Any) -> tuple[Any, ...] | None:
    deadline = time.monotonic() + 10
    with sqlite3.connect(workdir / "pacemaker.db") as database:
        while True:
            row: tuple[Any, ...] | None = database.execute(sql, parameters).fetchone()
            if row is not None or time.monotonic() > deadline:
                return row
            time.sleep(0.1)


async def test_a_sandboxed_run_is_a_child_of_its_tool_call(traced: Traced) -> None:
    async with traced.server.client() as http:
        response = await http.post(
            "/v1/tasks", json={"query": "Run this:\n```python\nprint(6 * 7)\n```", "model": "fake-model"}
        )
    assert response.status_code == 200, response.text
    trace_id = _wait_for_row(traced.server.workdir, "SELECT trace_id FROM task WHERE id = ?", response.json()["id"])
    assert trace_id is not None

    def ran(spans: list[dict[str, Any]]) -> bool:
        return any(span["name"] == "sandbox run" and span["trace_id"] == trace_id[0] for span in spans)

    spans = [span for span in await traced.spans(ran) if span["trace_id"] == trace_id[0]]
    (tool,) = _by_name(spans, "execute_tool python")
    (run,) = _by_name(spans, "sandbox run")
    assert run["parent_span_id"] == tool["span_id"]
    assert (
        run["attributes"]["pacemaker.sandbox.status"] == "ok" and run["attributes"]["pacemaker.sandbox.exit_code"] == 0
    )


async def test_failures_are_recorded_with_their_stable_code(traced: Traced) -> None:
    async with traced.server.client() as http:
        response = await http.post("/v1/tasks", json={"query": "#status=400", "model": "fake-model"})
    assert response.status_code == 400 and response.json()["code"] == "upstream_rejected", response.text
    request_id = response.headers["x-request-id"]

    def ended(spans: list[dict[str, Any]]) -> bool:
        return any(span["attributes"].get("pacemaker.request_id") == request_id for span in spans)

    spans = await traced.spans(ended)
    (request,) = [span for span in spans if span["attributes"].get("pacemaker.request_id") == request_id]
    spans = [span for span in spans if span["trace_id"] == request["trace_id"]]
    (chat,) = _by_name(spans, "chat fake-upstream-model")
    (agent,) = _by_name(spans, "invoke_agent pacemaker")
    for span in (chat, agent):
        assert span["attributes"]["error.type"] == "upstream_rejected"
        assert span["status"]["code"] == STATUS_ERROR
    # On the request span the code is said too, but a 4xx is the caller's error, not the server's (HTTP conventions).
    assert request["attributes"]["error.type"] == "upstream_rejected"
    assert request["attributes"]["http.response.status_code"] == 400
    assert request["status"]["code"] != STATUS_ERROR


async def test_a_streamed_chat_completion_is_a_request_span_with_its_model_call(traced: Traced) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        traced.server.client() as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT[:-2] + "00"}
        ) as response,
    ):
        assert response.status_code == 200
        assert (await response.aread()).endswith(b"data: [DONE]\n\n")
    request_id = response.headers["x-request-id"]

    def ended(spans: list[dict[str, Any]]) -> bool:
        return any(span["attributes"].get("pacemaker.request_id") == request_id for span in spans)

    spans = await traced.spans(ended, timeout=3)
    # The caller's flags said "not sampled", and the parent-based sampler follows it: nothing recorded.
    assert not ended(spans)
    # ... but the trace still travels to the upstream, marked not sampled.
    sent = (await traced.upstream_stats())["last_trace_headers"][-1]
    assert sent["traceparent"].startswith(f"00-{TRACE_ID}-") and sent["traceparent"].endswith("-00")

    async with traced.server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert (await response.aread()).endswith(b"data: [DONE]\n\n")
    request_id = response.headers["x-request-id"]
    spans = await traced.spans(ended)
    (request,) = [span for span in spans if span["attributes"].get("pacemaker.request_id") == request_id]
    children = [span for span in spans if span["parent_span_id"] == request["span_id"]]
    assert request["name"] == "POST /v1/chat/completions" and request["parent_span_id"] == ""
    assert sorted(span["name"] for span in children) == ["chat fake-upstream-model", "limiter admit", "limiter settle"]
    (chat,) = _by_name(children, "chat fake-upstream-model")
    assert chat["attributes"]["gen_ai.usage.output_tokens"] > 0


async def test_tasks_on_a_websocket_are_traces_of_their_own_under_the_handshake_traceparent(traced: Traced) -> None:
    socket_trace = "0af7651916cd43dd8448eb211c80319c"
    url = traced.server.base_url.replace("http://", "ws://") + "/v1/ws"
    headers = {"Authorization": f"Bearer {traced.server.key}", "traceparent": f"00-{socket_trace}-{CALLER_SPAN}-01"}
    task_ids = []
    async with websockets.connect(url, additional_headers=headers) as socket:
        for _ in range(2):
            await socket.send(json.dumps({"type": "task.create", "query": "hi", "model": "fake-model"}))
            while (event := json.loads(await socket.recv()))["type"] not in ("task.completed", "task.failed"):
                pass
            assert event["type"] == "task.completed", event
            task_ids.append(event["task_id"])

    def both(spans: list[dict[str, Any]]) -> bool:
        return len([s for s in spans if s["attributes"].get("pacemaker.task.id") in task_ids]) == 2

    agents = [span for span in await traced.spans(both) if span["attributes"].get("pacemaker.task.id") in task_ids]
    # No span for the socket (it may stay open for hours): each task is a child of the caller's span.
    assert [(span["trace_id"], span["parent_span_id"]) for span in agents] == [(socket_trace, CALLER_SPAN)] * 2
    assert {span["attributes"]["pacemaker.transport"] for span in agents} == {"ws"}
    for task_id in task_ids:
        row = _wait_for_row(traced.server.workdir, "SELECT trace_id FROM audit_record WHERE task_id = ?", task_id)
        assert row == (socket_trace,)


async def test_a_background_task_goes_on_under_the_request_that_started_it(traced: Traced) -> None:
    async with traced.server.client() as http:
        accepted = await http.post(
            "/v1/tasks",
            json={"query": "slowly #delay=0.05 #tokens=10", "model": "fake-model", "background": True},
            headers={"traceparent": TRACEPARENT},
        )
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["id"]

    def ended(spans: list[dict[str, Any]]) -> bool:
        return any(span["attributes"].get("pacemaker.task.id") == task_id for span in spans)

    spans = await traced.spans(ended)
    (agent,) = [span for span in spans if span["attributes"].get("pacemaker.task.id") == task_id]
    (request,) = [span for span in spans if span["span_id"] == agent["parent_span_id"]]
    chats = [span for span in spans if span["parent_span_id"] == agent["span_id"] and span["name"].startswith("chat ")]
    assert request["name"] == "POST /v1/tasks" and request["attributes"]["http.response.status_code"] == 202
    assert agent["trace_id"] == TRACE_ID and agent["attributes"]["pacemaker.transport"] == "background"
    # The 202 went out at once; the task's span goes on past it, with its model call inside.
    assert request["end_ns"] < agent["end_ns"] and len(chats) == 1
    assert chats[0]["end_ns"] > request["end_ns"]


async def test_probes_and_scrapes_are_not_traced(traced: Traced) -> None:
    probe_trace = "11111111111111111111111111111111"
    headers = {"traceparent": f"00-{probe_trace}-{CALLER_SPAN}-01"}
    async with traced.server.client() as http:
        for path in ("/health", "/health/ready", "/health/live", "/metrics"):
            assert (await http.get(path, headers=headers)).status_code == 200
        task = await http.post("/v1/tasks", json={"query": "hi", "model": "fake-model"}, headers=headers)
    task_id = task.json()["id"]

    def task_done(spans: list[dict[str, Any]]) -> bool:
        return any(span["attributes"].get("pacemaker.task.id") == task_id for span in spans)

    # The task's spans come after the probes' would have: the probes made none.
    names = [span["name"] for span in await traced.spans(task_done) if span["trace_id"] == probe_trace]
    assert names.count("POST /v1/tasks") == 1 and not [name for name in names if name.startswith("GET ")]


# --- the off switch and the configuration ------------------------------------------------------------------


def test_tracing_is_off_unless_the_environment_configures_it() -> None:
    assert tracing.exporter_from_environment({}) is None
    assert tracing.exporter_from_environment({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing.exporter_from_environment(endpoint) == "otlp"
    assert (
        tracing.exporter_from_environment({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == "otlp"
    )
    assert tracing.exporter_from_environment({"OTEL_TRACES_EXPORTER": "console"}) == "console"
    assert tracing.exporter_from_environment({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing.exporter_from_environment({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.exporter_from_environment({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "otlp"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
    ],
)
def test_what_cannot_be_exported_is_refused_before_serving(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv(variable, value)
    from app.server import uvicorn_options

    with pytest.raises(ConfigError, match=variable):
        uvicorn_options(load_settings())


def test_json_log_lines_carry_the_trace_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from app.observability.logging import _JsonFormatter

    provider = TracerProvider()
    monkeypatch.setattr(tracing, "TRACER", provider.get_tracer("test"))
    record = logging.LogRecord("app.test", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(_JsonFormatter().format(record))  # no span: no trace id
    with provider.get_tracer("test").start_as_current_span("work") as span:
        line = json.loads(_JsonFormatter().format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")


async def test_a_failed_child_span_says_our_stable_code_or_the_exception_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from app.sandbox.errors import SandboxBusy

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "TRACER", provider.get_tracer("test"))

    async def fail(exc: Exception) -> None:
        raise exc

    for exc in (SandboxBusy("full"), ValueError("bad")):
        with pytest.raises(type(exc)):
            await tracing.traced("work", fail(exc), {"a": 1})
    assert [span.attributes["error.type"] for span in exporter.get_finished_spans()] == ["sandbox_busy", "ValueError"]


@pytest.fixture(scope="module")
def untraced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacemakerServer, str]]:
    workdir = tmp_path_factory.mktemp("untraced")
    upstream_process, upstream = start_fake_upstream(workdir)
    try:
        server = start_pacemaker(workdir, server_config(workdir, upstream))
        try:
            yield server, upstream
        finally:
            server.process.stop()
    finally:
        upstream_process.stop()


async def test_with_tracing_off_the_upstream_gets_the_request_id_and_no_traceparent(
    untraced: tuple[PacemakerServer, str],
) -> None:
    server, upstream = untraced
    async with server.client() as http:
        response = await http.post(
            "/v1/tasks", json={"query": "hi", "model": "fake-model"}, headers={"traceparent": TRACEPARENT}
        )
    assert response.status_code == 200
    async with httpx.AsyncClient(base_url=upstream) as http:
        sent = (await http.get("/_control/stats")).json()["last_trace_headers"][-1]
    assert sent == {"traceparent": None, "x-request-id": response.headers["x-request-id"]}
    row = _wait_for_row(server.workdir, "SELECT trace_id FROM task WHERE id = ?", response.json()["id"])
    assert row == (None,)
    assert "tracing on" not in server.process.output()
