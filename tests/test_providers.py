"""Provider internals: the simulated provider, the OpenAI wire parser and the response builder."""

from __future__ import annotations

import pytest

from app.config import ProviderSettings
from app.errors import UpstreamError, UpstreamProtocolError
from app.providers.base import LLMChunk, LLMRequest, ResponseBuilder, ToolCallDelta, Usage
from app.providers.openai_wire import parse_completion, request_body
from app.providers.simulated import SimulatedProvider

CALCULATOR = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]


def simulated() -> SimulatedProvider:
    return SimulatedProvider("simulated", ProviderSettings(kind="simulated", tokens_per_second=0))


async def collect(request: LLMRequest) -> tuple[list[LLMChunk], ResponseBuilder]:
    builder = ResponseBuilder()
    chunks = []
    async for chunk in simulated().generate(request):
        chunks.append(chunk)
        builder.add(chunk)
    return chunks, builder


async def test_simulated_streams_and_non_streams_the_same_answer() -> None:
    messages = [{"role": "user", "content": "tell me about tides"}]
    streamed, s = await collect(LLMRequest(model="m", messages=messages, stream=True))
    whole, w = await collect(LLMRequest(model="m", messages=messages, stream=False))
    assert s.text == w.text and s.text.startswith("Simulated answer about tell me about tides")
    assert len(whole) == 2 and len(streamed) > 10
    assert s.usage == w.usage and s.usage is not None
    assert s.usage.completion_tokens == len(streamed) - 1


async def test_simulated_calls_the_calculator_only_when_offered_and_asked() -> None:
    ask = [{"role": "user", "content": "what is (2 + 3) * 4?"}]
    _, with_tool = await collect(LLMRequest(model="m", messages=ask, tools=CALCULATOR))
    response = with_tool.build(Usage)
    assert [(c.name, c.arguments) for c in response.tool_calls] == [("calculator", '{"expression":"(2 + 3) * 4"}')]
    assert response.finish_reason == "tool_calls"
    _, without_tool = await collect(LLMRequest(model="m", messages=ask))
    assert without_tool.build(Usage).tool_calls == []


async def test_simulated_answers_with_a_tool_result() -> None:
    messages = [
        {"role": "user", "content": "what is 6 * 7"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "calculator", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"result": 42}'},
    ]
    _, builder = await collect(LLMRequest(model="m", messages=messages, tools=CALCULATOR))
    assert builder.text == "The result is 42."


def test_wire_chunks_parse_into_deltas_and_usage() -> None:
    chunk = parse_completion(
        b'{"choices":[{"index":0,"delta":{"content":"hi","tool_calls":[{"index":0,"id":"c",'
        b'"function":{"name":"calc","arguments":"{\\"a\\""}}]},"finish_reason":null}]}'
    )
    assert chunk.text == "hi"
    assert chunk.tool_calls == [ToolCallDelta(index=0, id="c", name="calc", arguments='{"a"')]
    usage_only = parse_completion(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}')
    assert usage_only.usage == Usage(3, 4) and usage_only.text is None


@pytest.mark.parametrize("raw", [b"{not json", b'{"choices": [{"delta": {"content": 7}}]}', b'{"choices": "x"}', b"[]"])
def test_malformed_upstream_chunks_raise_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_completion(raw)


def test_an_in_band_upstream_error_raises() -> None:
    with pytest.raises(UpstreamError, match="overloaded"):
        parse_completion(b'{"error": {"message": "overloaded"}}')


def test_tool_call_fragments_fold_into_whole_calls() -> None:
    builder = ResponseBuilder()
    builder.add(LLMChunk(tool_calls=[ToolCallDelta(0, "a", "calc", '{"x":')]))
    builder.add(LLMChunk(tool_calls=[ToolCallDelta(1, "b", "calc", "{}")]))
    builder.add(LLMChunk(tool_calls=[ToolCallDelta(0, None, None, " 1}")]))
    response = builder.build(lambda: Usage(5, 6))
    assert [(c.id, c.arguments) for c in response.tool_calls] == [("a", '{"x": 1}'), ("b", "{}")]
    assert response.usage_estimated and response.usage == Usage(5, 6)


def test_request_body_asks_for_usage_when_streaming() -> None:
    body = request_body(LLMRequest(model="m", messages=[], stream=True, extra={"top_p": 0.5}))
    assert body["stream_options"] == {"include_usage": True}
    assert body["top_p"] == 0.5 and "tools" not in body


def test_prices_come_from_the_model_then_the_price_table_and_cached_input_is_cheaper() -> None:
    from decimal import Decimal

    from app.config import load_settings
    from app.providers.registry import ProviderRegistry

    settings = load_settings(
        providers={
            "simulated": {"kind": "simulated"},
            "up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
        },
        models={
            "sim-small": {"provider": "simulated"},
            "sim-medium": {"provider": "simulated"},
            "sim-large": {"provider": "simulated"},
            "mini": {"provider": "up", "upstream_model": "gpt-4o-mini"},
            "custom": {"provider": "up", "input_usd_per_mtok": "3", "output_usd_per_mtok": "4"},
        },
    )
    registry = ProviderRegistry(settings)  # no upstream is called
    mini = registry.route("mini")
    assert mini.cost(Usage(1_000_000, 1_000_000)) == Decimal("0.75")  # 0.15 in + 0.60 out
    assert mini.cost(Usage(1_000_000, 0, cached_tokens=1_000_000)) == Decimal("0.075")
    assert registry.route("custom").cost(Usage(1_000_000, 1_000_000)) == Decimal(7)
    assert registry.route("sim-small").cost(Usage(10**6, 10**6)) == 0


def test_cached_prompt_tokens_are_read_from_the_wire() -> None:
    chunk = parse_completion(
        b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8}}}'
    )
    assert chunk.usage == Usage(10, 2, cached_tokens=8)
