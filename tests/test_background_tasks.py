"""Background tasks on the embedded default (SQLite, the in-process event log): they outlive their
connection, their events resume without a gap, they can be listed, looked up and cancelled."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets

from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker

SLOW = "#delay=0.05 #tokens=40"  # about 2 s of tokens from the fake upstream


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("background")
    config = server_config(workdir, fake_upstream, limits={"max_background_tasks": 3, "max_concurrency": 20})
    server = start_pacemaker(workdir, config)
    yield server
    server.process.stop()


def key(server: PacemakerServer, name: str, *flags: str) -> str:
    created = json.loads(
        server.cli("keys", "create", "--name", f"{name}-{uuid.uuid4().hex[:6]}", "--json", *flags).stdout
    )
    return str(created["key"])


async def wait_until_done(http: httpx.AsyncClient, task_id: str, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resource: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}")).json()
        if resource["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return resource
        await asyncio.sleep(0.1)


async def events_of(http: httpx.AsyncClient, task_id: str, **headers: str) -> AsyncIterator[dict[str, Any]]:
    async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for event in read_sse(response):
            payload: dict[str, Any] = event.json()
            assert event.id == str(payload["seq"]) and event.event == payload["type"]
            yield payload


async def test_a_background_task_is_accepted_runs_on_and_replays_its_events(embedded: PacemakerServer) -> None:
    async with embedded.client() as http:
        accepted = await http.post(
            "/v1/tasks", json={"query": f"tell me {SLOW}", "model": "fake-model", "background": True}
        )
        assert accepted.status_code == 202, accepted.text
        task = accepted.json()
        assert accepted.headers["location"] == f"/v1/tasks/{task['id']}"
        assert task["status"] == "running" and task["background"] is True
        done = await wait_until_done(http, task["id"])
        assert done["status"] == "completed" and done["usage"]["completion_tokens"] == 40
        events = [event async for event in events_of(http, task["id"])]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "task.completed"
    assert "".join(event["delta"] for event in events if event["type"] == "token.delta") == done["output"]


async def test_a_streamed_background_task_outlives_its_client_and_resumes_without_a_gap(
    embedded: PacemakerServer,
) -> None:
    """The client drops after 5 events; the task goes on; Last-Event-ID and ?after= pick up exactly after."""
    body = {"query": f"story {SLOW}", "model": "fake-model", "background": True, "stream": True}
    seen: list[dict[str, Any]] = []
    async with embedded.client() as http:
        async with http.stream("POST", "/v1/tasks", json=body) as response:
            assert response.status_code == 200
            async for event in read_sse(response):
                seen.append(event.json())
                if len(seen) == 5:
                    break
        task_id = seen[0]["task_id"]
        async for event in events_of(http, task_id, **{"Last-Event-ID": "5"}):
            seen.append(event)
            if len(seen) == 12:
                break
        async with http.stream("GET", f"/v1/tasks/{task_id}/events", params={"after": 12}) as response:
            seen += [event.json() async for event in read_sse(response)]
        done = await wait_until_done(http, task_id)
    assert [event["seq"] for event in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["type"] == "task.completed" and done["status"] == "completed"
    assert "".join(event["delta"] for event in seen if event["type"] == "token.delta") == done["output"]


async def test_cancel_ends_a_running_task_at_once_and_a_finished_one_is_409(
    embedded: PacemakerServer, upstream_stats: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:10]
    async with embedded.client() as http:
        accepted = await http.post(
            "/v1/tasks",
            json={"query": f"long #delay=0.05 #tokens=400 #tag={tag}", "model": "fake-model", "background": True},
        )
        task_id = accepted.json()["id"]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        cancelled = await http.post(f"/v1/tasks/{task_id}/cancel")
        assert time.monotonic() - started < 1.5
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        assert cancelled.json()["error"]["code"] == "cancelled"
        events = [event async for event in events_of(http, task_id)]
        assert events[-1]["type"] == "task.failed" and events[-1]["code"] == "cancelled"
        again = await http.post(f"/v1/tasks/{task_id}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "task_finished"
    for _ in range(50):  # the upstream sees its connection closed, long before its 400th token
        stats = (await upstream_stats.get("/_control/stats")).json()
        if any(seen["tag"] == tag for seen in stats["disconnects"]):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the upstream never saw the cancelled task's connection close")


async def test_tasks_are_listed_newest_first_plain_ones_too_and_only_to_their_key(embedded: PacemakerServer) -> None:
    mine, theirs, admin = key(embedded, "mine"), key(embedded, "theirs"), key(embedded, "admin", "--admin")
    async with embedded.client(mine) as http:
        plain = (await http.post("/v1/tasks", json={"query": "plain one"})).json()["id"]
        streamed = await http.post("/v1/tasks", json={"query": "streamed one", "stream": True})
        streamed_id = json.loads(streamed.text.split("data: ", 1)[1].split("\n", 1)[0])["task_id"]
        background = (await http.post("/v1/tasks", json={"query": "background one", "background": True})).json()["id"]
        await wait_until_done(http, background)
        await asyncio.sleep(0.5)  # plain tasks' records reach the database within a flush interval
        listed = (await http.get("/v1/tasks")).json()
        assert [task["id"] for task in listed["data"]][:3] == [background, streamed_id, plain]
        assert {task["status"] for task in listed["data"][:3]} == {"completed"}
        looked_up = (await http.get(f"/v1/tasks/{plain}")).json()
        assert looked_up["output"] and looked_up["background"] is False
        assert (await http.get("/v1/tasks", params={"status": "failed"})).json()["data"] == []
    async with embedded.client(theirs) as http:
        for path in (f"/v1/tasks/{plain}", f"/v1/tasks/{background}/events", f"/v1/tasks/{background}"):
            refused = await http.get(path)
            assert refused.status_code == 404 and refused.json()["code"] == "task_not_found", path
        assert (await http.post(f"/v1/tasks/{background}/cancel")).status_code == 404
        assert (await http.get("/v1/tasks")).json()["data"] == []
        assert (await http.get("/v1/tasks", params={"api_key_id": 1})).status_code == 403
    async with embedded.client(admin) as http:
        assert (await http.get(f"/v1/tasks/{plain}")).status_code == 200
        ids = [task["id"] for task in (await http.get("/v1/tasks", params={"limit": 500})).json()["data"]]
        assert {plain, background, streamed_id} <= set(ids)


async def test_a_key_may_run_only_so_many_background_tasks(embedded: PacemakerServer) -> None:
    limited = key(embedded, "limited")
    async with embedded.client(limited) as http:
        body = {"query": f"busy {SLOW}", "model": "fake-model", "background": True}
        accepted = [await http.post("/v1/tasks", json=body) for _ in range(3)]
        assert [response.status_code for response in accepted] == [202, 202, 202]
        refused = await http.post("/v1/tasks", json=body)
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_background_tasks"
        assert "retry-after" in refused.headers
        for response in accepted:
            await http.post(f"/v1/tasks/{response.json()['id']}/cancel")
        assert (await http.post("/v1/tasks", json=body)).status_code == 202


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/tasks/task_nothing_here", {}, 404, "task_not_found"),
        ("/v1/tasks/task_nothing_here/events", {}, 404, "task_not_found"),
        ("/v1/tasks/{bg}/events", {"Last-Event-ID": "abc"}, 400, "invalid_resume_point"),
        ("/v1/tasks/{bg}/events?after=-1", {}, 400, "invalid_resume_point"),
        ("/v1/tasks/{plain}/events", {}, 409, "events_not_kept"),
    ],
)
async def test_bad_task_ids_and_resume_points_are_problems(
    embedded: PacemakerServer, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    async with embedded.client() as http:
        background = (await http.post("/v1/tasks", json={"query": "x", "background": True})).json()["id"]
        plain = (await http.post("/v1/tasks", json={"query": "x"})).json()["id"]
        response = await http.get(path.format(bg=background, plain=plain), headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code


async def test_a_background_task_created_on_a_socket_survives_the_socket(embedded: PacemakerServer) -> None:
    url = embedded.base_url.replace("http://", "ws://") + "/v1/ws"
    headers = {"Authorization": f"Bearer {embedded.key}"}
    async with websockets.connect(url, additional_headers=headers) as socket:
        await socket.send(
            json.dumps({"type": "task.create", "query": f"x {SLOW}", "model": "fake-model", "background": True})
        )
        first = json.loads(await socket.recv())
        assert first["type"] == "task.started"
    async with embedded.client() as http:
        done = await wait_until_done(http, first["task_id"])
    assert done["status"] == "completed" and done["usage"]["completion_tokens"] == 40


async def test_a_socket_subscribes_to_a_task_started_over_http(embedded: PacemakerServer) -> None:
    async with embedded.client() as http:
        task_id = (
            await http.post("/v1/tasks", json={"query": f"x {SLOW}", "model": "fake-model", "background": True})
        ).json()["id"]
    url = embedded.base_url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {embedded.key}"}) as socket:
        await socket.send(json.dumps({"type": "subscribe", "task_id": "task_unknown"}))
        assert json.loads(await socket.recv())["code"] == "task_not_found"  # and the socket stays open
        await socket.send(json.dumps({"type": "subscribe", "task_id": task_id, "after": 2, "ref": "sub"}))
        seen = []
        while not seen or seen[-1]["type"] not in ("task.completed", "task.failed"):
            seen.append(json.loads(await socket.recv()))
    assert all(event["ref"] == "sub" for event in seen)
    assert [event["seq"] for event in seen] == list(range(3, 3 + len(seen)))
    assert seen[-1]["type"] == "task.completed"


async def test_background_tasks_hold_their_keys_concurrency_slots_while_they_run(embedded: PacemakerServer) -> None:
    limited = key(embedded, "slots", "--max-concurrency", "2")
    async with embedded.client(limited) as http:
        body = {"query": f"busy {SLOW}", "model": "fake-model", "background": True}
        running = [(await http.post("/v1/tasks", json=body)).json()["id"] for _ in range(2)]
        refused = await http.post("/v1/tasks", json={"query": "one more, plain"})
        assert refused.status_code == 429 and refused.json()["code"] == "concurrency_limit_exceeded"
        for task_id in running:
            await wait_until_done(http, task_id)
        assert (await http.post("/v1/tasks", json={"query": "now there is room"})).status_code == 200


async def test_a_repeated_background_request_with_the_same_idempotency_key_gets_the_same_task(
    embedded: PacemakerServer,
) -> None:
    headers = {"Idempotency-Key": f"job-{uuid.uuid4().hex}"}
    body = {"query": "run me once", "background": True}
    async with embedded.client() as http:
        first = await http.post("/v1/tasks", json=body, headers=headers)
        repeat = await http.post("/v1/tasks", json=body, headers=headers)
    assert first.status_code == repeat.status_code == 202
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json()["id"] == first.json()["id"]
