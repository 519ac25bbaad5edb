"""One model call, shared by the agent loop and the OpenAI-compatible route.

It passes the provider's chunks through, folds them into a response, and records the outcome
(tokens, latency, errors) once, whichever transport consumes it. Limits, breakers and retries
around each model call belong here too, so every way in gets them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Self

from app.errors import AppError
from app.observability.metrics import Metrics
from app.providers.base import LLMChunk, LLMRequest, LLMResponse, ResponseBuilder, Usage
from app.providers.registry import ModelRoute
from app.providers.tokens import count_message_tokens, count_text_tokens


class ModelCall:
    def __init__(self, route: ModelRoute, request: LLMRequest, metrics: Metrics) -> None:
        self.route = route
        self.request = request
        self._metrics = metrics
        self._builder = ResponseBuilder()
        self._chunks: AsyncGenerator[LLMChunk, None] = route.provider.generate(request)
        self._started = time.perf_counter()
        self._recorded = False
        self._response: LLMResponse | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> LLMChunk:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._finish()
            raise
        except AppError as exc:
            self._record(exc.code)
            raise
        self._builder.add(chunk)
        return chunk

    def response(self) -> LLMResponse:
        """The whole response; only once the chunks are exhausted."""
        if self._response is None:
            raise RuntimeError("the model call has not finished")
        return self._response

    async def aclose(self) -> None:
        """Stop the provider (closing its upstream connection) if the call did not finish."""
        await self._chunks.aclose()
        if not self._recorded:
            self._record("cancelled")

    def _finish(self) -> None:
        if self._response is not None:
            return
        # Upstreams that report no usage get an estimate, flagged as such.
        estimate = Usage(count_message_tokens(self.request.messages), count_text_tokens(self._builder.text))
        self._response = self._builder.build(estimate)
        self._record("ok")
        model = self.route.name
        self._metrics.tokens.labels(model, "prompt").inc(self._response.usage.prompt_tokens)
        self._metrics.tokens.labels(model, "completion").inc(self._response.usage.completion_tokens)

    def _record(self, outcome: str) -> None:
        self._recorded = True
        self._metrics.llm_calls.labels(self.route.name, outcome).inc()
        self._metrics.llm_seconds.labels(self.route.name).observe(time.perf_counter() - self._started)
