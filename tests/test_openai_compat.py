"""The OpenAI-compatible route, driven by the official openai SDK and by raw HTTP for fault cases."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import PacemakerServer, read_sse


def sdk(server: PacemakerServer, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=key or server.key, max_retries=0)


@pytest.mark.parametrize("model", ["sim-small", "fake-model"])
async def test_sdk_non_streamed_chat_gets_content_and_usage(server: PacemakerServer, model: str) -> None:
    async with sdk(server) as client:
        completion = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say something"}]
        )
    assert completion.model == model
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["sim-small", "fake-model"])
async def test_sdk_streamed_chat_gets_deltas_then_a_usage_chunk(server: PacemakerServer, model: str) -> None:
    async with sdk(server) as client:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Stream something"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_sdk_tool_calls_are_returned_to_the_caller_not_executed(server: PacemakerServer) -> None:
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    async with sdk(server) as client:
        completion = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "What is 6 * 7?"}], tools=tools
        )
        stream = await client.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "What is 6 * 7?"}], tools=tools, stream=True
        )
        streamed = [c async for c in stream]
    [call] = completion.choices[0].message.tool_calls or []
    assert call.function.name == "calculator" and "6 * 7" in call.function.arguments
    assert completion.choices[0].finish_reason == "tool_calls"
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function is not None and deltas[0].function.name == "calculator"


async def test_sdk_bad_key_raises_authentication_error(server: PacemakerServer) -> None:
    async with sdk(server, key="pk_not-a-real-key") as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"


async def test_sdk_unknown_model_raises_not_found(server: PacemakerServer) -> None:
    async with sdk(server) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])


async def test_sdk_lists_the_configured_models(server: PacemakerServer) -> None:
    async with sdk(server) as client:
        models = [model.id async for model in client.models.list()]
    assert {"sim-small", "sim-medium", "sim-large", "fake-model"} <= set(models)


@pytest.mark.parametrize(
    ("directive", "status", "code"),
    [
        ("#status=500", 502, "upstream_error"),
        ("#status=429", 503, "upstream_rate_limited"),
        ("#status=400", 400, "upstream_rejected"),
        ("#status=401", 502, "upstream_auth_failed"),
        ("#latency=6", 504, "upstream_timeout"),  # past the provider's 5 s read timeout
    ],
)
async def test_upstream_faults_map_to_typed_errors_in_openai_envelope(
    client: httpx.AsyncClient, directive: str, status: int, code: str
) -> None:
    for stream in (False, True):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": directive}], "stream": stream}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == status, (stream, response.text)
        assert response.json()["error"]["code"] == code
        if status == 503:
            assert response.headers["retry-after"] == "1"
        if directive.startswith("#latency"):
            break  # once is enough for a slow case


@pytest.mark.parametrize("directive", ["#malformed", "#drop=3"])
async def test_faults_after_the_first_token_end_the_stream_with_an_error_event(
    client: httpx.AsyncClient, directive: str
) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": directive}], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [event async for event in read_sse(response)]
    assert events[-1].data != "[DONE]"
    error = events[-1].json()["error"]
    assert error["code"] in ("upstream_protocol_error", "upstream_unavailable")


async def test_sdk_raises_on_a_stream_that_breaks(server: PacemakerServer) -> None:
    async with sdk(server) as client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "#drop=4"}], stream=True
        )
        with pytest.raises(openai.APIError):
            async for _chunk in stream:
                pass


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "sim-small", "messages": []}, 422),
        ({"model": "sim-small"}, 422),
        ({"model": "sim-small", "messages": [{"role": "wizard", "content": "x"}]}, 422),
        ({"model": "sim-small", "messages": [{"role": "user", "content": "x"}], "n": 2}, 422),
    ],
)
async def test_invalid_chat_requests_get_openai_errors(client: httpx.AsyncClient, body: dict, status: int) -> None:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_malformed_json_on_the_openai_route_is_a_400_in_its_envelope(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", content=b'{"model": "sim', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
