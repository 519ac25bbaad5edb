"""One model call, shared by the agent loop and the OpenAI-compatible route.

It passes the provider's chunks through, folds them into a response, and records the outcome
(tokens, latency, errors) once, whichever transport consumes it. With a Ticket (an admitted
request) it also enforces: a reservation for this call, the upstream's circuit breaker (and the
model's fallback while it is open), retries until the first chunk (never after: the client may
already have it), and settlement to the usage actually spent, also when the call fails or the
client leaves.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Self

from opentelemetry.trace import Span

from app.enforcement.breaker import CircuitBreaker, classify
from app.enforcement.enforcer import Reservation, Ticket
from app.errors import AppError, CircuitOpen
from app.observability import tracing
from app.observability.metrics import Metrics
from app.providers.base import LLMChunk, LLMRequest, LLMResponse, ResponseBuilder, Usage
from app.providers.registry import ModelRoute
from app.providers.tokens import count_message_tokens, count_text_tokens


@functools.lru_cache(maxsize=4096)
def _event_tokens(text: str) -> int:
    """The estimated tokens of one streamed event's text (at least one): the same few pieces recur."""
    return max(1, count_text_tokens(text))


@dataclass(frozen=True, slots=True)
class Fallback:
    model: str
    fallback: str
    reason: str  # the refusal's code (circuit_open)


class ModelCall:
    def __init__(
        self,
        route: ModelRoute,
        request: LLMRequest,
        metrics: Metrics,
        ticket: Ticket | None = None,
        *,
        prompt_tokens: int | None = None,  # the caller's estimate, when it already made one
    ) -> None:
        self.route = route
        self.request = request
        self.retries = 0
        self._metrics = metrics
        self._ticket = ticket
        self._builder = ResponseBuilder()
        self._prompt_estimate = prompt_tokens if prompt_tokens is not None else count_message_tokens(request.messages)
        self._chunks: AsyncGenerator[LLMChunk, None] | None = None
        self._breaker: CircuitBreaker | None = None
        self._reservation: Reservation | None = None
        self._started = time.perf_counter()
        self._recorded = False
        self._response: LLMResponse | None = None
        self._text_chunks = 0
        # Completion tokens seen so far (an estimate per chunk), against an upstream that ignores max_tokens.
        self._completion_seen = 0
        self.cut_off = False  # the upstream went past max_tokens and was stopped
        self.fallbacks: list[Fallback] = []  # models whose open breaker handed the call on, in order
        self._first_seen = False  # a chunk with text or a tool call has come (time to first token)
        self._attempt_started: float | None = None  # the upstream request in progress
        self._span: Span | None = None  # while tracing is on

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> LLMChunk:
        try:
            if self._chunks is None:
                chunk = await self._open()
            elif self.cut_off:
                await self._stop_reading()
                raise StopAsyncIteration
            else:
                chunk = await anext(self._chunks)
        except StopAsyncIteration:
            await self._finish()
            raise
        except AppError as exc:
            await self._fail(exc)
            raise
        if self.request.stream and self.request.max_tokens is not None:
            self._count_completion(chunk, self.request.max_tokens)
        self._builder.add(chunk)
        if not self._first_seen and (chunk.text or chunk.tool_calls):
            self._first_seen = True
            if self.request.stream:  # a whole body at once says nothing of the first token
                self._metrics.model(self.route.name, self.route.provider.name).first_token().observe(
                    time.perf_counter() - self._started
                )
        if chunk.text:
            first = self._text_chunks == 0
            # One per upstream event with text (a chunk may fold several read at once).
            self._text_chunks += 1 if chunk.texts is None else len(chunk.pieces)
            if first and self._ticket is not None and self._ticket.audit is not None:
                self._ticket.audit.first_token()
        return chunk

    def _count_completion(self, chunk: LLMChunk, max_tokens: int) -> None:
        """Stop after the event that passes max_tokens: an upstream that ignores it cannot spend past
        what was reserved by more than that one event (once 5.7x a budget). A chunk folding several
        events is cut after that one (the events after it are dropped, never relayed)."""
        if chunk.texts is not None:
            last = len(chunk.texts) - 1
            for n, text in enumerate(chunk.texts):
                if text:
                    self._completion_seen += _event_tokens(text)
                if self._completion_seen > max_tokens and not (n == last and chunk.finish_reason is not None):
                    if n < last:
                        chunk.truncate(n + 1)
                    self.cut_off = True
                    return
            return
        seen = _event_tokens(chunk.text) if chunk.text else 0
        for delta in chunk.tool_calls or ():
            seen += count_text_tokens(delta.arguments)
        self._completion_seen += seen
        if self._completion_seen > max_tokens and chunk.finish_reason is None:
            self.cut_off = True

    async def _stop_reading(self) -> None:
        # Closing the provider's stream closes its upstream connection, so the upstream stops too.
        if self._chunks is not None:
            await self._chunks.aclose()
        self._builder.finish_reason = "length"

    def response(self) -> LLMResponse:
        """The whole response; only once the chunks are exhausted."""
        if self._response is None:
            raise RuntimeError("the model call has not finished")
        return self._response

    async def aclose(self) -> None:
        """Stop the provider (closing its upstream connection) if the call did not finish."""
        if self._chunks is not None:
            await self._chunks.aclose()
        if not self._recorded:
            self._record("cancelled")
            if self._breaker is not None:
                self._breaker.record_ignored()  # a client leaving says nothing of the upstream
            await self._settle(self._usage_so_far())

    async def _open(self) -> LLMChunk:
        """Start the call: reserve, pass the breaker, and retry until the first chunk arrives; while a
        model's breaker is open, its fallback (if it has one) takes the call, for good."""
        ticket = self._ticket
        if ticket is not None and ticket.budgeted and not self.request.stream:
            # Under a budget the upstream is always streamed (and folded into one response, as a
            # non-streamed call is): a stream can be stopped at max_tokens, a finished body cannot.
            self.request = replace(self.request, stream=True)
        if tracing.TRACER is not None:
            self._span = tracing.start_chat(self)
        while True:
            try:
                return await self._open_route()
            except CircuitOpen as exc:
                fallback = self.route.fallback
                if fallback is None:
                    raise
                # The breaker refused before anything was sent: nothing of this route was spent.
                self.fallbacks.append(Fallback(self.route.name, fallback.name, exc.code))
                await self._release_reservation()
                self.route = fallback
                relay_model = fallback.name if self.request.relay_model is not None else None
                self.request = replace(self.request, model=fallback.upstream_model, relay_model=relay_model)

    async def _open_route(self) -> LLMChunk:
        ticket = self._ticket
        if ticket is not None:
            self._reservation = await ticket.reserve(self.route, self._prompt_estimate, self.request.max_tokens or 0)
            self._breaker = ticket.enforcer.breaker(self.route)
        attempt = 0
        while True:
            if self._breaker is not None:
                self._breaker.before_call()
            chunks = self.route.provider.generate(self.request)
            self._attempt_started = time.perf_counter()
            try:
                # With tracing on, the span is current while the request goes out: its traceparent.
                first = await (anext(chunks) if self._span is None else tracing.first_chunk(self._span, chunks))
            except AppError as exc:
                await chunks.aclose()
                self._attempt_done()
                delay = ticket.enforcer.retry.delay_before_retry(attempt + 1, exc) if ticket else None
                if delay is None:
                    raise
                self._record_breaker(exc)
                attempt += 1
                self.retries += 1
                self._metrics.llm_retries.labels(self.route.name).inc()
                await ticket.enforcer.sleep(delay)  # type: ignore[union-attr]  # delay implies a ticket
                continue
            except BaseException:
                await chunks.aclose()
                self._attempt_done()
                raise
            self._chunks = chunks
            return first

    async def _release_reservation(self) -> None:
        if self._ticket is not None and self._reservation is not None:
            reservation, self._reservation = self._reservation, None
            await self._ticket.settle(reservation, Usage(), Decimal(0))

    async def _finish(self) -> None:
        if self._response is not None:
            return
        # Upstreams that report no usage get an estimate, flagged as such.
        self._response = response = self._builder.build(
            lambda: Usage(self._prompt_estimate, count_text_tokens(self._builder.text))
        )
        self._record("ok")
        if self._breaker is not None:
            self._breaker.record_success()
        model = self.route.name
        series = self._metrics.model(model, self.route.provider.name)
        series.tokens("prompt").inc(response.usage.prompt_tokens)
        series.tokens("completion").inc(response.usage.completion_tokens)
        await self._settle(response.usage, estimated=response.usage_estimated)

    async def _fail(self, exc: AppError) -> None:
        if self._recorded:
            return
        self._record(exc.code)
        self._record_breaker(exc)
        await self._settle(self._usage_so_far())

    def _record_breaker(self, exc: BaseException) -> None:
        if self._breaker is None or isinstance(exc, CircuitOpen):
            return  # the breaker's own refusal is not an outcome of the upstream
        if classify(exc) == "failure":
            self._breaker.record_failure()
        else:
            self._breaker.record_ignored()

    def _usage_so_far(self) -> Usage:
        """What a call that did not finish has spent: its prompt, if it started, and the tokens
        streamed so far (one per text chunk, as OpenAI-compatible upstreams stream them)."""
        if self._chunks is None:
            return Usage()
        return Usage(self._prompt_estimate, self._text_chunks)

    async def _settle(self, usage: Usage, *, estimated: bool = True) -> None:
        if self._ticket is None or self._reservation is None:
            return
        reservation, self._reservation = self._reservation, None
        cost = self.route.cost(usage)
        if self._ticket.audit is not None:
            self._ticket.audit.add_call(usage, cost, estimated=estimated, retries=self.retries)
        await self._ticket.settle(reservation, usage, cost)

    def _record(self, outcome: str) -> None:
        self._recorded = True
        self._attempt_done()
        series = self._metrics.model(self.route.name, self.route.provider.name)
        series.calls(outcome).inc()
        series.seconds().observe(time.perf_counter() - self._started)
        if self._span is not None:
            response = self._response
            usage = response.usage if response is not None else self._usage_so_far()
            tracing.end_chat(self._span, self, outcome, usage, response.finish_reason if response else None)

    def _attempt_done(self) -> None:
        """The upstream request in progress has ended (answered in full, failed, or closed)."""
        if self._attempt_started is not None:
            elapsed = time.perf_counter() - self._attempt_started
            self._attempt_started = None
            self._metrics.model(self.route.name, self.route.provider.name).upstream().observe(elapsed)
