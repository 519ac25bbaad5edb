"""The python tool end to end: the agent runs code in the sandbox, clients call it directly, keys are kept apart."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx

from tests.support import PacemakerServer, read_sse

PROGRAM = "Please run this:\n```python\nprint(6 * 7)\n```"


async def test_the_simulated_model_runs_python_and_answers_with_its_output(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/tasks", json={"query": PROGRAM, "stream": True}) as response:
        events = [e.json() async for e in read_sse(response)]
    [call] = [e for e in events if e["type"] == "tool.call"]
    [result] = [e for e in events if e["type"] == "tool.result"]
    assert call["tool"] == "python" and call["arguments"] == {"code": "print(6 * 7)\n"}
    assert result["error"] is None
    assert result["result"]["status"] == "ok" and result["result"]["stdout"] == "42\n"
    assert events[-1]["type"] == "task.completed"
    assert events[-1]["output"] == "The program printed: 42"


async def test_a_scripted_upstream_model_runs_python_and_answers_with_its_output(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/tasks", json={"query": PROGRAM, "model": "fake-model"})
    result = response.json()
    assert result["output"] == "The output is 42."
    [call] = result["tool_calls"]
    assert call["tool"] == "python" and call["result"]["stdout"] == "42\n"


async def test_direct_calls_report_the_sandbox_outcome_as_the_error(client: httpx.AsyncClient) -> None:
    looping = await client.post(
        "/v1/tools/python/invoke", json={"arguments": {"code": "while True: pass", "timeout_s": 1}}
    )
    failing = await client.post("/v1/tools/python/invoke", json={"arguments": {"code": "def f():\n    1/0\nf()"}})
    assert looping.status_code == 200
    assert looping.json()["error"] == "sandbox_timeout"
    assert looping.json()["result"]["status"] == "sandbox_timeout"
    assert failing.json()["error"] == "error"
    assert failing.json()["result"]["exit_code"] == 1
    assert "ZeroDivisionError" in failing.json()["result"]["stderr"]


async def test_the_server_keeps_answering_while_guests_spin(server: PacemakerServer) -> None:
    async with server.client() as http:
        spin = asyncio.create_task(
            http.post("/v1/tools/python/invoke", json={"arguments": {"code": "while True: pass", "timeout_s": 2}})
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        health = [await http.get("/health/live") for _ in range(5)]
        elapsed = time.monotonic() - started
        assert all(r.status_code == 200 for r in health)
        assert not spin.done()  # the guest was still running while the server answered
        assert elapsed < 1.5
        assert (await spin).json()["error"] in ("sandbox_timeout", "sandbox_cpu_limit")  # whichever ends it first


async def test_a_session_workspace_persists_and_belongs_to_its_key(server: PacemakerServer) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    other_key = json.loads(server.cli("keys", "create", "--name", "other", "--json").stdout)["key"]
    write = {"code": "open('/workspace/note.txt', 'w').write('kept')", "timeout_s": 5}
    read = {"code": "import os\nprint(os.listdir('/workspace'))", "timeout_s": 5}
    async with server.client() as mine, server.client(key=other_key) as theirs:
        await mine.post("/v1/tools/python/invoke", json={"arguments": write, "session_id": session})
        again = await mine.post("/v1/tools/python/invoke", json={"arguments": read, "session_id": session})
        elsewhere = await theirs.post("/v1/tools/python/invoke", json={"arguments": read, "session_id": session})
        no_session = await mine.post("/v1/tools/python/invoke", json={"arguments": read})
    assert again.json()["result"]["stdout"] == "['note.txt']\n"
    assert elsewhere.json()["result"]["stdout"] == "[]\n"
    assert no_session.json()["error"] == "error"  # no /workspace without a session


async def test_a_key_without_python_cannot_run_it_and_its_model_never_sees_it(server: PacemakerServer) -> None:
    key = json.loads(server.cli("keys", "create", "--name", "no-python", "--tools", "calculator", "--json").stdout)[
        "key"
    ]
    async with server.client(key=key) as http:
        refused = await http.post("/v1/tools/python/invoke", json={"arguments": {"code": "print(1)"}})
        task = await http.post("/v1/tasks", json={"query": PROGRAM})
    assert refused.status_code == 403 and refused.json()["code"] == "tool_not_allowed"
    # The simulated model calls only what it is offered: here the calculator, for the arithmetic.
    assert [call["tool"] for call in task.json()["tool_calls"]] == ["calculator"]
