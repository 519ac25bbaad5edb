"""Conversations on the embedded default (the in-process pool), end to end with real processes: what the
fake upstream is sent, every transport, one turn at a time, the context budget, isolation, the API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from app.providers.tokens import count_message_tokens
from app.tools.python import workspace_name
from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker

CONTEXT = 250  # fake-small's context_tokens: about three of the turns below
SYSTEM = {"role": "system", "content": "You are Pacemaker, a helpful agent. Use the tools offered when they help."}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("sessions")
    config = server_config(
        workdir,
        fake_upstream,
        sessions={"max_session_bytes": 6000},
        models={"fake-small": {"provider": "fake", "upstream_model": "fake-upstream-model", "context_tokens": CONTEXT}},
        sandbox={"sessions_dir": str(workdir / "workspaces")},
        limits={"max_concurrency": 20},
        retries={"max_retries": 0},
        breakers={"min_calls": 1_000_000},
    )
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


def new_key(server: PacemakerServer, *flags: str) -> tuple[str, int]:
    created = json.loads(server.cli("keys", "create", "--name", f"s-{uuid.uuid4().hex[:6]}", "--json", *flags).stdout)
    return str(created["key"]), int(created["id"])


def fresh(prefix: str = "chat") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def bodies(upstream_stats: httpx.AsyncClient, tag: str) -> list[dict[str, Any]]:
    """The requests the fake upstream got for the query tagged `tag` (its last user message), in order."""
    found = []
    for body in (await upstream_stats.get("/_control/stats")).json()["last_bodies"]:
        users = [m for m in body["messages"] if m["role"] == "user"]
        if users and f"#tag={tag}" in users[-1]["content"]:
            found.append(body)
    return found


async def ask(http: httpx.AsyncClient, query: str, session: str | None, **fields: Any) -> dict[str, Any]:
    body = {"query": query, "model": "fake-model", **fields}
    if session is not None:
        body["session_id"] = session
    response = await http.post("/v1/tasks", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def run_on(server: PacemakerServer, transport: str, body: dict[str, Any]) -> dict[str, Any]:
    """Run a task over one transport; its terminal event (the task result, for a completed task)."""
    if transport == "ws":
        url = server.base_url.replace("http://", "ws://") + "/v1/ws"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {server.key}"}) as socket:
            await socket.send(json.dumps({"type": "task.create", **body}))
            while True:
                event: dict[str, Any] = json.loads(await socket.recv())
                if event["type"] in ("task.completed", "task.failed", "error"):
                    return event
    async with server.client() as http:
        if transport == "json":
            result: dict[str, Any] = (await http.post("/v1/tasks", json=body)).json()
            return result
        if transport == "sse":
            async with http.stream("POST", "/v1/tasks", json={**body, "stream": True}) as response:
                events = [e.json() async for e in read_sse(response)]
            return events[-1]  # type: ignore[no-any-return]
        accepted = (await http.post("/v1/tasks", json={**body, "background": True})).json()
        async with http.stream("GET", f"/v1/tasks/{accepted['id']}/events") as response:
            events = [e.json() async for e in read_sse(response)]
        return events[-1]  # type: ignore[no-any-return]


def split_turns(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A session's messages, turn by turn: each turn starts with its user message."""
    turns: list[list[dict[str, Any]]] = []
    for message in messages:
        if message["role"] == "user":
            turns.append([])
        turns[-1].append(message)
    return turns


async def test_the_second_turn_sends_the_first_with_its_tool_call_and_a_fresh_session_sends_none(
    embedded: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    session, first, second, other = fresh(), fresh("t"), fresh("t"), fresh("t")
    async with embedded.client() as http:
        one = await ask(http, f"What is 17 * 23 + 4? #tag={first}", session)
        two = await ask(http, f"And what was that again? #tag={second}", session)
        alone = await ask(http, f"And what was that again? #tag={other}", fresh())
    assert [call["tool"] for call in one["tool_calls"]] == ["calculator"]
    assert one["session"] == {"id": session, "history_turns": 0, "turns_left_out": 0, "stored": True, "reason": None}
    assert two["session"]["history_turns"] == 1 and two["session"]["stored"] is True
    assert alone["session"]["history_turns"] == 0
    _call, answered = await bodies(upstream_stats, first)  # the tool call, then the answer after its result
    assert [m["role"] for m in answered["messages"]] == ["system", "user", "assistant", "tool"]
    [sent] = await bodies(upstream_stats, second)
    # Exactly the first turn as its model saw it (query, tool call, tool result), its answer, then the query.
    assert sent["messages"] == [
        *answered["messages"],
        {"role": "assistant", "content": one["output"]},
        {"role": "user", "content": f"And what was that again? #tag={second}"},
    ]
    assert sent["messages"][2]["tool_calls"][0]["id"] == sent["messages"][3]["tool_call_id"]
    [unrelated] = await bodies(upstream_stats, other)
    assert unrelated["messages"] == [SYSTEM, {"role": "user", "content": f"And what was that again? #tag={other}"}]


@pytest.mark.parametrize(
    ("first", "second"), [("json", "sse"), ("sse", "ws"), ("ws", "background"), ("background", "json")]
)
async def test_every_transport_carries_the_conversation(
    embedded: PacemakerServer, upstream_stats: httpx.AsyncClient, first: str, second: str
) -> None:
    session, tags = fresh(), (fresh("t"), fresh("t"))
    queries = (f"My favourite colour is teal. #tag={tags[0]}", f"What is my favourite colour? #tag={tags[1]}")
    one = await run_on(embedded, first, {"query": queries[0], "model": "fake-model", "session_id": session})
    two = await run_on(embedded, second, {"query": queries[1], "model": "fake-model", "session_id": session})
    for result in (one, two):  # a JSON answer is the task result itself, without a type
        assert result.get("type", "task.completed") == "task.completed" and result["output"], result
    assert two["session"]["history_turns"] == 1, two
    [sent] = await bodies(upstream_stats, tags[1])
    assert sent["messages"] == [
        SYSTEM,
        {"role": "user", "content": queries[0]},
        {"role": "assistant", "content": one["output"]},
        {"role": "user", "content": queries[1]},
    ]


async def test_two_turns_at_once_one_runs_and_the_other_is_409_session_busy(embedded: PacemakerServer) -> None:
    session = fresh()
    slow = {"query": "tell me slowly #latency=1.5", "model": "fake-model", "session_id": session}
    async with embedded.client() as http:
        answers = await asyncio.gather(http.post("/v1/tasks", json=slow), http.post("/v1/tasks", json=slow))
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        [busy] = [a for a in answers if a.status_code == 409]
        problem = busy.json()
        assert busy.headers["content-type"].startswith("application/problem+json")
        assert problem["code"] == "session_busy" and problem["retryable"] is True
        assert busy.headers["retry-after"] == "1" and problem["task_id"].startswith("task_")
        # A background turn holds the session while it runs; a socket's task.create is refused too.
        accepted = (await http.post("/v1/tasks", json={**slow, "background": True})).json()
        refused = await http.post("/v1/tasks", json={**slow, "stream": True})
        assert refused.status_code == 409 and refused.json()["task_id"] == accepted["id"]
        assert (await http.delete(f"/v1/sessions/{session}")).status_code == 409
        url = embedded.base_url.replace("http://", "ws://") + "/v1/ws"
        headers = {"Authorization": f"Bearer {embedded.key}"}
        async with websockets.connect(url, additional_headers=headers) as socket:
            await socket.send(json.dumps({"type": "task.create", "ref": "r", **slow}))
            error = json.loads(await socket.recv())
        assert error["type"] == "error" and error["code"] == "session_busy" and error["retry_after"] == 1
        async with http.stream("GET", f"/v1/tasks/{accepted['id']}/events") as response:
            events = [e.json() async for e in read_sse(response)]
        assert events[-1]["session"]["history_turns"] == 1
        after = await ask(http, "and now?", session)
    assert after["session"]["history_turns"] == 2  # the refused ones appended nothing


async def test_a_failed_or_cancelled_turn_appends_nothing(embedded: PacemakerServer) -> None:
    session = fresh()
    async with embedded.client() as http:
        await ask(http, "remember this", session)
        failed = await http.post(
            "/v1/tasks", json={"query": "#status=500", "model": "fake-model", "session_id": session}
        )
        assert failed.status_code == 502 and failed.json()["code"] == "upstream_error"
        body = {"query": "long #delay=0.05 #tokens=400", "model": "fake-model", "session_id": session}
        accepted = (await http.post("/v1/tasks", json={**body, "background": True})).json()
        await asyncio.sleep(0.3)
        assert (await http.post(f"/v1/tasks/{accepted['id']}/cancel")).json()["status"] == "cancelled"
        # A stream whose client goes away mid-answer is cancelled too.
        async with http.stream("POST", "/v1/tasks", json={**body, "stream": True}) as response:
            async for event in read_sse(response):
                if event.json()["type"] == "token.delta":
                    break
        await asyncio.sleep(0.3)
        stored = (await http.get(f"/v1/sessions/{session}")).json()
        after = await ask(http, "still there?", session)
    assert stored["turns"] == 1 and [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert after["session"]["history_turns"] == 1


async def test_a_session_longer_than_the_context_sends_the_newest_whole_turns_that_fit(
    embedded: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    session, max_tokens = fresh(), 60
    async with embedded.client() as http:
        for n in range(6):  # every other turn calls the calculator: a tool call and its result
            query = f"What is {n} + 17 * 3?" if n % 2 else f"turn {n} #tokens=30"
            await ask(http, query, session, model="fake-small", max_tokens=max_tokens)
        tag = fresh("t")
        query = f"the next one #tag={tag}"
        body = {"query": query, "model": "fake-small", "session_id": session, "max_tokens": max_tokens, "stream": True}
        async with http.stream("POST", "/v1/tasks", json=body) as response:
            events = [e.json() async for e in read_sse(response)]
        stored = (await http.get(f"/v1/sessions/{session}")).json()
        # A query that leaves no room at all: no history, and still no failure.
        long_query = "word " * 330
        huge = await ask(http, long_query, session, model="fake-small", max_tokens=max_tokens)
    assert [e["type"] for e in events[:2]] == ["task.started", "session.truncated"]
    truncated, result = events[1], events[-1]
    assert truncated["session_id"] == session and truncated["turns_left_out"] + truncated["turns_sent"] == 6
    sent_turns = truncated["turns_sent"]
    assert truncated["turns_left_out"] >= 1 and sent_turns >= 1
    assert result["type"] == "task.completed" and result["session"]["history_turns"] == sent_turns
    assert result["session"]["turns_left_out"] == truncated["turns_left_out"]
    turns = split_turns(stored["messages"])
    kept = [m for turn in turns[6 - sent_turns : 6] for m in turn]
    [sent] = await bodies(upstream_stats, tag)
    assert sent["messages"] == [SYSTEM, *kept, {"role": "user", "content": query}]
    assert count_message_tokens(sent["messages"]) + max_tokens <= CONTEXT
    older = turns[6 - sent_turns - 1]
    assert count_message_tokens([*older, *sent["messages"]]) + max_tokens > CONTEXT  # the next older did not fit
    assert any(m.get("tool_calls") for m in kept), "the window should hold a tool turn"
    for index, message in enumerate(sent["messages"]):
        for call in message.get("tool_calls") or ():  # never a call without its result right after it
            assert any(m.get("tool_call_id") == call["id"] for m in sent["messages"][index + 1 : index + 3])
    assert huge["session"]["history_turns"] == 0 and huge["session"]["turns_left_out"] == 7


async def test_the_history_counts_against_the_keys_token_ceiling_and_a_refusal_frees_the_session(
    embedded: PacemakerServer,
) -> None:
    key, _ = new_key(embedded, "--max-tokens-per-request", "1200")
    session = fresh()
    async with embedded.client(key) as http:
        first = await ask(http, "hello #tokens=600", session, max_tokens=1000)
        assert first["session"]["stored"] is True
        refused = await http.post(
            "/v1/tasks", json={"query": "again", "model": "fake-model", "session_id": session, "max_tokens": 1000}
        )
        assert refused.status_code == 400 and refused.json()["code"] == "token_limit_exceeded"
        alone = await ask(http, "again", fresh(), max_tokens=1000)  # the same request without the history passes
        assert alone["session"]["history_turns"] == 0
        assert (await http.delete(f"/v1/sessions/{session}")).status_code == 204  # not held by the refused task


async def test_another_keys_session_is_404_and_its_task_with_the_same_id_starts_fresh(
    embedded: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    other, _ = new_key(embedded)
    session, tag = fresh(), fresh("t")
    async with embedded.client() as mine, embedded.client(other) as theirs:
        await ask(mine, "my secret is 42", session)
        for response in (await theirs.get(f"/v1/sessions/{session}"), await theirs.delete(f"/v1/sessions/{session}")):
            assert response.status_code == 404 and response.json()["code"] == "session_not_found"
        assert session not in [s["id"] for s in (await theirs.get("/v1/sessions")).json()["data"]]
        their_turn = await ask(theirs, f"what is my secret? #tag={tag}", session)
        mine_after = (await mine.get(f"/v1/sessions/{session}")).json()
    assert their_turn["session"]["history_turns"] == 0
    [sent] = await bodies(upstream_stats, tag)
    assert sent["messages"] == [SYSTEM, {"role": "user", "content": f"what is my secret? #tag={tag}"}]
    assert mine_after["turns"] == 1 and "secret is 42" in mine_after["messages"][0]["content"]


async def test_sessions_are_listed_read_and_deleted_with_their_workspace(embedded: PacemakerServer) -> None:
    key, key_id = new_key(embedded)
    names = sorted(fresh(f"s{n}") for n in range(3))
    write = {"code": "open('/workspace/note.txt', 'w').write('kept')", "timeout_s": 5}
    read = {"code": "import os\nprint(os.listdir('/workspace'))", "timeout_s": 5}
    workspace = embedded.workdir / "workspaces" / workspace_name(key_id, names[0])
    async with embedded.client(key) as http:
        started = time.time()
        for n, name in enumerate(names):  # no id in the query: "s0-3a9..." reads as arithmetic to the fake model
            await ask(http, f"hello, session {n}", name)
        await ask(http, "second turn", names[0])
        await http.post("/v1/tools/python/invoke", json={"arguments": write, "session_id": names[0]})
        assert Path(workspace, "note.txt").read_text() == "kept"
        first = (await http.get("/v1/sessions", params={"limit": 2})).json()
        second = (await http.get("/v1/sessions", params={"limit": 2, "cursor": first["next_cursor"]})).json()
        assert [s["id"] for s in first["data"] + second["data"]] == names and second["next_cursor"] is None
        summary = first["data"][0]
        assert summary["turns"] == 2 and summary["bytes"] > 0 and summary["tokens"] > 0
        for moment in ("created_at", "last_used_at"):
            assert started - 5 < _timestamp(summary[moment]) < time.time() + 5
        detail = (await http.get(f"/v1/sessions/{names[0]}")).json()
        assert [m["role"] for m in detail["messages"]] == ["user", "assistant", "user", "assistant"]
        assert detail["messages"][2]["content"] == "second turn" and detail["turns"] == 2
        assert (await http.delete(f"/v1/sessions/{names[0]}")).status_code == 204
        assert not workspace.exists()
        gone = await http.get(f"/v1/sessions/{names[0]}")
        assert gone.status_code == 404 and gone.json()["code"] == "session_not_found"
        assert (await http.delete(f"/v1/sessions/{names[0]}")).status_code == 404
        listing = await http.post("/v1/tools/python/invoke", json={"arguments": read, "session_id": names[0]})
        assert listing.json()["result"]["stdout"] == "[]\n"
        for bad in ({"cursor": "!!"}, {"cursor": "eA"}, {"limit": 0}, {"limit": 501}):
            refused = await http.get("/v1/sessions", params=bad)
            assert refused.status_code == 422 and refused.json()["code"] == "invalid_request", bad


def _timestamp(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


@pytest.mark.parametrize("session_id", ["x" * 129, "has space", "caf\u00e9", "", "a/b"])
async def test_a_bad_session_id_is_422(embedded: PacemakerServer, session_id: str) -> None:
    async with embedded.client() as http:
        refused = await http.post("/v1/tasks", json={"query": "hi", "session_id": session_id})
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_request", refused.text
        if session_id and "/" not in session_id:
            looked_up = await http.get(f"/v1/sessions/{session_id}")
            assert looked_up.status_code == 422 and looked_up.json()["code"] == "invalid_request"
    url = embedded.base_url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {embedded.key}"}) as socket:
        await socket.send(json.dumps({"type": "task.create", "query": "hi", "session_id": session_id}))
        assert json.loads(await socket.recv())["code"] == "invalid_request"


async def test_a_turn_larger_than_max_session_bytes_runs_but_is_not_stored(embedded: PacemakerServer) -> None:
    session = fresh()
    async with embedded.client() as http:
        await ask(http, "a small one", session)
        big = await ask(http, "a big one #tokens=1500", session, max_tokens=4000)
        stored = (await http.get(f"/v1/sessions/{session}")).json()
    assert big["output"] and big["session"] == {
        "id": session,
        "history_turns": 1,
        "turns_left_out": 0,
        "stored": False,
        "reason": "turn_too_large",
    }
    assert stored["turns"] == 1


async def test_the_audit_row_and_the_task_record_carry_the_session_and_the_metrics_move(
    embedded: PacemakerServer,
) -> None:
    admin, key_id = new_key(embedded, "--admin")
    session = fresh()
    async with embedded.client(admin) as http:
        one = await ask(http, "first", session)
        two = await ask(http, "second", session)
        rows: list[dict[str, Any]] = []
        for _ in range(50):
            rows = (await http.get("/v1/audit", params={"api_key_id": key_id})).json()["data"]
            if len([r for r in rows if r["task_id"] in (one["id"], two["id"])]) == 2:
                break
            await asyncio.sleep(0.1)
        metrics = (await http.get("/metrics")).text
        record = (await http.get(f"/v1/tasks/{two['id']}")).json()
    assert record["session_id"] == session  # the task record too
    assert {r["task_id"]: r["session_id"] for r in rows if r["task_id"]} == {one["id"]: session, two["id"]: session}
    samples = {
        name: float(value)
        for name, value in (
            line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("pacemaker_session")
        )
    }
    assert samples['pacemaker_session_lookups_total{result="hit"}'] >= 1
    assert samples['pacemaker_session_lookups_total{result="miss"}'] >= 1
    assert samples["pacemaker_sessions"] >= 1 and samples["pacemaker_session_bytes"] > 0


async def test_with_sessions_off_a_session_id_only_names_a_workspace(
    tmp_path: Path, fake_upstream: str, upstream_stats: httpx.AsyncClient
) -> None:
    server = start_pacemaker(tmp_path, server_config(tmp_path, fake_upstream, sessions={"enabled": False}))
    try:
        session, tag = fresh(), fresh("t")
        async with server.client() as http:
            first = await ask(http, "remember me", session)
            second = await ask(http, f"do you? #tag={tag}", session)
            assert first["session"] is None and second["session"] is None
            assert (await http.get("/v1/sessions")).json() == {"data": [], "next_cursor": None}
            assert (await http.get(f"/v1/sessions/{session}")).status_code == 404
        [sent] = await bodies(upstream_stats, tag)
        assert sent["messages"] == [SYSTEM, {"role": "user", "content": f"do you? #tag={tag}"}]
    finally:
        server.process.stop()
