"""The SSE writer's keep-alive pings while a stream is idle, and the tasks route's token.delta frames."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import orjson
import pytest

from app.agent.events import TaskStarted, TokenDelta
from app.tasks.router import _sse, sse_frame
from tests.support import PacemakerServer, server_config, start_pacemaker


@pytest.fixture(scope="module")
def pinging_server(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    workdir = tmp_path_factory.mktemp("pings")
    config = server_config(workdir, fake_upstream, server={"sse_ping_seconds": 0.2})
    started = start_pacemaker(workdir, config)
    yield started
    started.process.stop()


@pytest.mark.parametrize("route", ["chat", "tasks"])
async def test_an_idle_stream_gets_pings_then_its_events(pinging_server: PacemakerServer, route: str) -> None:
    # The upstream sends its first token after 1 s: five ping intervals of silence.
    query = "#first=1 #delay=0.01 #tokens=3"
    if route == "chat":
        path = "/v1/chat/completions"
        body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": query}]}
    else:
        path, body = "/v1/tasks", {"query": query, "model": "fake-model", "stream": True}
    async with pinging_server.client() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        received = b"".join([part async for part in response.aiter_bytes()])
    assert received.count(b": ping\n\n") >= 1
    assert received.index(b": ping\n\n") < received.index(b"alpha")
    assert received.endswith(b"data: [DONE]\n\n") if route == "chat" else b"event: task.completed" in received


@pytest.mark.parametrize("delta", ["alpha", " beta", 'a "quoted" \\ back/slash', "\n\t\u0001\u2028 é ✓ 😀", "%s %d %%"])
@pytest.mark.parametrize("task_id", ["task_0123456789abcdef", "odd%id"])
async def test_token_frames_are_the_bytes_the_event_model_renders(delta: str, task_id: str) -> None:
    events = [
        TaskStarted(task_id=task_id, seq=1, model="m", provider="p", tier=None),
        TokenDelta(task_id=task_id, seq=2, delta=delta),
        TokenDelta(task_id=task_id, seq=3, delta=delta + "!"),
    ]

    async def run() -> object:
        for event in events:
            yield event

    frames = [frame async for frame in _sse(run())]  # type: ignore[arg-type]
    assert frames == [sse_frame(event) for event in events]
    assert orjson.loads(frames[1].split(b"data: ", 1)[1]) == events[1].model_dump()


async def test_the_token_deltas_of_one_read_are_one_frame() -> None:
    spec = SimpleNamespace(burst=0)
    tokens = [TokenDelta(task_id="t", seq=n, delta=f" w{n}") for n in range(2, 7)]

    async def run() -> object:
        yield TaskStarted(task_id="t", seq=1, model="m", provider="p", tier=None)
        for left, event in zip((2, 1, 0, 0, 1), tokens, strict=True):  # a read of three, one of one, ...
            spec.burst = left
            yield event
        spec.burst = 0
        yield TaskStarted(task_id="t", seq=7, model="m", provider="p", tier=None)

    frames = [frame async for frame in _sse(run(), spec)]  # type: ignore[arg-type]
    rendered = [sse_frame(event) for event in tokens]
    assert frames[1:4] == [b"".join(rendered[:3]), rendered[3], rendered[4]]
    assert len(frames) == 5  # the last read was cut short by another event: flushed before it
