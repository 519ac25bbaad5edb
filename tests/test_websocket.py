"""WS /v1/ws with a real `websockets` client: concurrent tasks, cancellation, bad messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.support import PacemakerServer, server_config, start_pacemaker


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


async def test_a_message_nested_too_deep_gets_an_error_and_the_socket_stays_open(server: PacemakerServer) -> None:
    """A 300-deep context once closed the socket without a close frame and killed its running tasks."""
    async with await connect(server) as socket:
        await socket.send(
            json.dumps(
                {"type": "task.create", "ref": "slow", "query": "x #delay=0.05 #tokens=30", "model": "fake-model"}
            )
        )
        assert (await receive(socket))["type"] == "task.started"
        deep = '{"type": "task.create", "query": "x", "context": ' + '{"a": ' * 300 + "1" + "}" * 300 + "}"
        await socket.send(deep)
        kinds: list[str] = []
        error: dict[str, Any] = {}
        while not kinds or kinds[-1] not in ("task.completed", "task.failed"):
            event = await receive(socket)
            if event["type"] == "error":
                error = event
            kinds.append(event["type"])
        assert error["code"] == "invalid_request" and "nested" in error["detail"]
        assert kinds[-1] == "task.completed"  # the running task was not harmed


async def test_a_browser_authenticates_with_the_bearer_subprotocol_and_only_it_is_echoed(
    server: PacemakerServer,
) -> None:
    """Browsers cannot set headers on a WebSocket; the key goes in Sec-WebSocket-Protocol, not the URL."""
    async with await websockets.connect(
        ws_url(server),
        subprotocols=["pacemaker.bearer", server.key],
        max_queue=None,  # type: ignore[list-item]
    ) as socket:
        assert socket.subprotocol == "pacemaker.bearer"
        assert server.key not in (socket.response.headers.get("sec-websocket-protocol") or "")
        await socket.send(json.dumps({"type": "task.create", "query": "via subprotocol"}))
        assert (await receive(socket))["type"] == "task.started"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url(server), subprotocols=["pacemaker.bearer", "pk_wrong"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 401


async def test_a_key_revoked_while_its_socket_is_open_closes_it_with_4401(tmp_path: Path) -> None:
    config = server_config(tmp_path, None, auth={"key_cache_seconds": 1})
    started = start_pacemaker(tmp_path, config)
    try:
        created = json.loads(started.cli("keys", "create", "--name", "revoked-later", "--json").stdout)
        idle_key, busy_key = created["key"], started.key
        async with (
            await websockets.connect(
                ws_url(started), additional_headers={"Authorization": f"Bearer {idle_key}"}
            ) as idle,
            await websockets.connect(
                ws_url(started), additional_headers={"Authorization": f"Bearer {busy_key}"}
            ) as busy,
        ):
            await busy.send(json.dumps({"type": "task.create", "query": "before the revoke"}))
            while (await receive(busy))["type"] != "task.completed":
                pass
            started.cli("keys", "revoke", str(created["id"]))
            # The idle socket: closed by the periodic check within key_cache_seconds (+ margin).
            error = await asyncio.wait_for(receive(idle), timeout=10)
            assert error["type"] == "error" and error["code"] == "invalid_api_key"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(idle.recv(), timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
            # The other key's socket is untouched.
            await busy.send(json.dumps({"type": "task.create", "query": "after the revoke"}))
            assert (await receive(busy))["type"] == "task.started"
    finally:
        started.process.stop()


async def create_until_closed(socket: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Keep asking for tasks until the server closes the socket: what it sent, and its close code."""
    seen: list[dict[str, Any]] = []
    try:
        while True:
            await socket.send(json.dumps({"type": "task.create", "query": "after the revoke"}))
            await asyncio.sleep(0.2)
            seen.append(await asyncio.wait_for(receive(socket), timeout=10))
            while seen[-1]["type"] not in ("task.completed", "task.failed", "error"):
                seen.append(await asyncio.wait_for(receive(socket), timeout=10))
    except websockets.ConnectionClosed as closed:
        # What arrived before the close frame is still readable after it.
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                seen.append(await asyncio.wait_for(receive(socket), timeout=5))
        return seen, closed.rcvd.code if closed.rcvd is not None else None


async def test_task_creates_after_a_revoke_stop_within_the_key_cache_time(tmp_path: Path) -> None:
    """Each task.create authenticates again through the cache: a revoked key starts nothing more."""
    config = server_config(tmp_path, None, auth={"key_cache_seconds": 2})
    started = start_pacemaker(tmp_path, config)
    try:
        async with await connect(started) as socket:
            await socket.send(json.dumps({"type": "task.create", "query": "while valid"}))
            assert (await receive(socket))["type"] == "task.started"
            started.cli("keys", "revoke", started.key[:10])
            revoked_at = asyncio.get_running_loop().time()
            seen, close_code = await create_until_closed(socket)
            errors = [event for event in seen if event["type"] == "error"]
            assert [error["code"] for error in errors] == ["invalid_api_key"], seen
            assert close_code == 4401
            assert asyncio.get_running_loop().time() - revoked_at < 2 + 2 + 3  # cache + check period + margin
    finally:
        started.process.stop()


async def test_open_websockets_per_key_are_capped_with_a_429_problem(tmp_path: Path) -> None:
    config = server_config(tmp_path, None, server={"ws_max_per_key": 3})
    started = start_pacemaker(tmp_path, config)
    try:
        other = json.loads(started.cli("keys", "create", "--name", "other", "--json").stdout)["key"]
        sockets = [await connect(started) for _ in range(3)]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(started)
        response = refused.value.response
        assert response.status_code == 429
        assert response.headers["content-type"] == "application/problem+json"
        assert json.loads(response.body)["code"] == "too_many_websockets"
        assert "retry-after" in response.headers
        # Another key is not affected, and a closed socket frees its slot.
        async with await websockets.connect(ws_url(started), additional_headers={"Authorization": f"Bearer {other}"}):
            pass
        await sockets.pop().close()
        for _ in range(50):  # the server notices the close asynchronously
            try:
                sockets.append(await connect(started))
                break
            except websockets.InvalidStatus:
                await asyncio.sleep(0.1)
        assert len(sockets) == 3
        for socket in sockets:
            await socket.close()
    finally:
        started.process.stop()


async def test_a_refused_handshake_is_not_logged_as_an_error(server: PacemakerServer) -> None:
    """uvicorn logs an ERROR for every handshake refused with an HTTP answer; a flood of bad keys must not
    flood the error log."""
    for _ in range(3):
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(ws_url(server), additional_headers={"Authorization": "Bearer pk_wrong"})
    await asyncio.sleep(0.2)
    assert "without completing handshake" not in server.process.output()
