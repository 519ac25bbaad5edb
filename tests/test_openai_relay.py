"""The chat route's stream relay: the upstream's SSE events go out as they came, read only for billing.

Where the public model name is the upstream's, every event is the upstream's own bytes (the fake
upstream writes its JSON with Python's json.dumps, ", " and ": " separators, which Pacemaker's own
orjson never does); where it differs, the name is rewritten in every event. Either way the usage is
counted, max_tokens still stops an upstream that ignores it, and a client leaving closes the upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.errors import UpstreamProtocolError
from app.providers.openai import _EventStream
from app.providers.tokens import count_text_tokens
from tests.support import PacemakerServer, read_sse, server_config, start_pacemaker

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[PacemakerServer]:
    """A server with `same-model`, which the upstream knows by the same name, besides `fake-model`."""
    workdir = tmp_path_factory.mktemp("relay")
    config = server_config(workdir, fake_upstream, breakers={"min_calls": 1_000_000}, retries={"max_retries": 0})
    config["models"]["same-model"] = {"provider": "fake", "input_usd_per_mtok": "1.0", "output_usd_per_mtok": "2.0"}
    started = start_pacemaker(workdir, config)
    yield started
    started.process.stop()


@pytest.fixture
async def relay(relay_server: PacemakerServer) -> AsyncIterator[httpx.AsyncClient]:
    async with relay_server.client() as http:
        yield http


def expected_text(tokens: int) -> str:
    return "".join(("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(tokens))


async def stream(http: httpx.AsyncClient, model: str, content: str, **extra: Any) -> list[str]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": content}], **extra}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        return [event.data async for event in read_sse(response)]


async def completion_tokens(http: httpx.AsyncClient, model: str) -> float:
    response = await http.get("/metrics")
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "pacemaker_tokens_total" and sample.labels == {"model": model, "kind": "completion"}:
                return sample.value
    return 0.0


async def test_events_are_relayed_byte_for_byte_when_the_upstream_knows_the_public_name(
    relay: httpx.AsyncClient,
) -> None:
    before = await completion_tokens(relay, "same-model")
    events = await stream(relay, "same-model", "#tokens=40", stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for data in chunks:  # the upstream's own serialisation, untouched
        assert json.dumps(json.loads(data)) == data
        assert json.loads(data)["id"] == "chatcmpl-fake" and json.loads(data)["model"] == "same-model"
    parsed = [json.loads(data) for data in chunks]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"])
    assert text == expected_text(40)
    assert [c["choices"][0]["finish_reason"] for c in parsed if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "stop"
    ]
    usage = parsed[-1]["usage"]
    assert not parsed[-1]["choices"] and usage["completion_tokens"] == 40
    assert await completion_tokens(relay, "same-model") - before == 40  # counted as before: exact usage


async def test_the_usage_chunk_is_left_out_unless_asked_for(relay: httpx.AsyncClient) -> None:
    events = await stream(relay, "same-model", "#tokens=5")
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(data) for data in events[:-1])


async def test_the_upstream_model_name_is_rewritten_to_the_public_one(relay: httpx.AsyncClient) -> None:
    events = await stream(relay, "fake-model", "#tokens=30", stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    parsed = [json.loads(data) for data in events[:-1]]
    assert {c["model"] for c in parsed} == {"fake-model"}
    assert all("fake-upstream-model" not in data for data in events)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"]) == expected_text(30)
    assert parsed[-1]["usage"]["completion_tokens"] == 30


async def test_max_tokens_stops_an_upstream_that_ignores_it_within_one_event(relay: httpx.AsyncClient) -> None:
    # The fake upstream ignores max_tokens and sends all 300 at once: the reads fold many events.
    events = await stream(relay, "same-model", "#tokens=300", max_tokens=5, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    parsed = [json.loads(data) for data in events[:-1]]
    deltas = [
        c["choices"][0]["delta"]["content"] for c in parsed if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    # Stopped after the event that passed 5 (estimated: 1 + 1 + 1 + 1 + 2, " epsilon" is two), not one later.
    assert deltas == ["alpha", " beta", " gamma", " delta", " epsilon"]
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"
    # The upstream never reported its usage: the estimate of what was relayed.
    assert parsed[-1]["usage"]["completion_tokens"] == count_text_tokens("".join(deltas))


async def test_a_client_leaving_a_relayed_stream_closes_the_upstream(
    relay: httpx.AsyncClient, upstream_stats: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:12]
    body = {
        "model": "same-model",
        "stream": True,
        "messages": [{"role": "user", "content": f"#tag={tag} #delay=0.05 #tokens=400"}],
    }
    received = 0
    async with relay.stream("POST", "/v1/chat/completions", json=body) as response:
        async for _event in read_sse(response):
            received += 1
            if received == 5:
                break
    deadline = time.monotonic() + 5
    seen: list[dict[str, Any]] = []
    while not seen and time.monotonic() < deadline:
        seen = [d for d in (await upstream_stats.get("/_control/stats")).json()["disconnects"] if d["tag"] == tag]
        await asyncio.sleep(0.05)
    assert seen and seen[0]["chunks_sent"] < 400


def event(content: str | None = None, finish: str | None = None, model: str = "up") -> bytes:
    delta = {} if content is None else {"content": content}
    payload = {"id": "x", "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_a_read_of_many_tokens_is_one_chunk_with_a_text_per_event_and_the_bytes_as_they_came() -> None:
    events = _EventStream("up")
    last = event(" c")
    [chunk] = events.feed(event("") + event("a") + event(" b") + last[:-30])  # the last event torn
    assert chunk.texts == ["", "a", " b"] and chunk.text == "a b" and chunk.pieces == ["a", " b"]
    assert chunk.raw == [event("") + event("a") + event(" b")]  # the public name is the upstream's: unchanged
    [rest] = events.feed(last[-30:])
    assert rest.texts == [" c"] and rest.raw == [last]
    chunk.truncate(2)  # max_tokens passed at the second event: the third is never relayed
    assert chunk.texts == ["", "a"] and chunk.text == "a" and chunk.raw == [event(""), event("a")]


def test_a_different_upstream_name_is_replaced_in_the_bytes() -> None:
    [chunk] = _EventStream("public").feed(event("a", model="up") + event(" b", model="up"))
    assert chunk.raw == [event("a", model="public") + event(" b", model="public")]
    # A name that also appears elsewhere: each event re-serialised with the public name.
    [chunk] = _EventStream("public").feed(event("model", model="up") + event(" up", model="up"))
    frames = [f for f in (chunk.raw or [])]
    assert [orjson.loads(f[6:])["model"] for f in frames] == ["public", "public"]
    assert "".join(orjson.loads(f[6:])["choices"][0]["delta"]["content"] for f in frames) == "model up"


def test_events_torn_across_reads_and_the_finish_chunk() -> None:
    events = _EventStream("pub")
    data = (
        event("a")
        + event(" b")
        + event(None, "stop")
        + b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\ndata: [DONE]\n\n'
    )
    chunks = [c for n in range(0, len(data), 7) for c in events.feed(data[n : n + 7])]
    texts = [t for c in chunks for t in (c.texts if c.texts is not None else [c.text or ""])]
    assert "".join(texts) == "a b"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [2]
    assert events.complete and not events.pending
    frames = [f for c in chunks for f in (c.raw or [])]
    assert len(frames) == 4 and all(orjson.loads(f[6:])["model"] == "pub" for f in frames)


def test_a_whole_stream_in_one_read() -> None:
    usage = b'data: {"model": "up", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    body = event("") + event("a") + event(" b") + event(None, "stop")
    events = _EventStream("up")
    chunks = events.feed(b": stream open\n\n" + body + usage + b"data: [DONE]\n\n")
    assert [c.texts for c in chunks] == [["", "a", " b", ""], None]
    assert chunks[0].finish_reason == "stop" and chunks[0].raw == [body]
    assert chunks[1].usage is not None and chunks[1].usage.completion_tokens == 2 and chunks[1].raw == [usage]
    assert events.done and events.complete


def test_a_malformed_event_fails_only_after_the_tokens_before_it() -> None:
    events = _EventStream(None)
    chunks = events.feed(event("a") + event(" b") + b'data: {"choices": [{"delta": {"content": 7}}]}\n\n' + event(" c"))
    assert [c.texts for c in chunks] == [["a", " b"]] and chunks[0].raw is None
    with pytest.raises(UpstreamProtocolError):
        events.raise_failure()
