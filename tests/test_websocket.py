"""WS /v1/ws with a real `websockets` client: concurrent tasks, cancellation, bad messages."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.support import PacemakerServer


def ws_url(server: PacemakerServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/ws"


async def connect(server: PacemakerServer) -> ClientConnection:
    # max_queue=None: these tests close sockets with events still unread; a bounded client queue
    # stops the client reading, and its closing handshake then waits out its close_timeout.
    return await websockets.connect(
        ws_url(server), additional_headers={"Authorization": f"Bearer {server.key}"}, max_queue=None
    )


async def receive(socket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await socket.recv(decode=True))
    return message


async def test_two_tasks_on_one_socket_interleave_and_each_completes(server: PacemakerServer) -> None:
    async with await connect(server) as socket:
        # The fake upstream paces its tokens, so both tasks are in flight at the same time.
        for ref in ("a", "b"):
            await socket.send(
                json.dumps(
                    {
                        "type": "task.create",
                        "ref": ref,
                        "query": f"task {ref} #delay=0.02 #tokens=15",
                        "model": "fake-model",
                    }
                )
            )
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        order: list[str] = []
        done = 0
        while done < 2:
            event = await receive(socket)
            events[event["ref"]].append(event)
            order.append(event["ref"])
            done += event["type"] in ("task.completed", "task.failed")
    assert set(events) == {"a", "b"}
    for ref, stream in events.items():
        assert len({e["task_id"] for e in stream}) == 1, ref
        assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1))
        final = stream[-1]
        assert final["type"] == "task.completed"
        assert final["usage"]["completion_tokens"] == 15
        assert "".join(e["delta"] for e in stream if e["type"] == "token.delta") == final["output"]
    # Interleaved: the events of one task do not all arrive before the other's first.
    first_b, last_a = order.index("b"), len(order) - 1 - order[::-1].index("a")
    assert first_b < last_a


async def test_task_cancel_stops_a_running_task(server: PacemakerServer) -> None:
    async with await connect(server) as socket:
        await socket.send(
            json.dumps({"type": "task.create", "query": "long #delay=0.05 #tokens=200", "model": "fake-model"})
        )
        started = await receive(socket)
        assert started["type"] == "task.started"
        await socket.send(json.dumps({"type": "task.cancel", "task_id": started["task_id"]}))
        while (event := await receive(socket))["type"] == "token.delta":
            pass
        assert event["type"] == "task.failed" and event["code"] == "cancelled"
        # The socket stays usable.
        await socket.send(json.dumps({"type": "task.create", "query": "after cancel"}))
        kinds = []
        while not kinds or kinds[-1] not in ("task.completed", "task.failed"):
            kinds.append((await receive(socket))["type"])
        assert kinds[-1] == "task.completed"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json at all", "invalid_message"),
        ("[1, 2, 3]", "invalid_message"),
        (json.dumps({"type": "task.explode"}), "invalid_message"),
        (json.dumps({"type": "task.create", "ref": 7}), "invalid_request"),
        (json.dumps({"type": "task.create", "query": "x", "mode": "turbo"}), "invalid_request"),
        (json.dumps({"type": "task.create", "query": "x", "model": "nope"}), "model_not_found"),
        (json.dumps({"type": "task.cancel", "task_id": "task_unknown"}), "not_found"),
    ],
)
async def test_bad_messages_get_an_error_and_the_socket_stays_open(
    server: PacemakerServer, message: str, code: str
) -> None:
    async with await connect(server) as socket:
        await socket.send(message)
        error = await receive(socket)
        assert error["type"] == "error" and error["code"] == code, error
        await socket.send(json.dumps({"type": "task.create", "query": "still there?", "ref": "next"}))
        event = await receive(socket)
        assert event["type"] == "task.started" and event["ref"] == "next"


async def test_binary_garbage_gets_an_error_too(server: PacemakerServer) -> None:
    async with await connect(server) as socket:
        await socket.send(b"\x00\xff\x10")
        assert (await receive(socket))["code"] == "invalid_message"


async def test_connecting_without_a_valid_key_is_refused_with_401(server: PacemakerServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url(server), additional_headers={"Authorization": "Bearer pk_wrong"})
    assert refused.value.response.status_code == 401
    async with await websockets.connect(ws_url(server) + f"?api_key={server.key}", max_queue=None) as socket:
        await socket.send(json.dumps({"type": "task.create", "query": "query-param key"}))
        assert (await receive(socket))["type"] == "task.started"
