"""Runs a non-streamed request at most once per (API key, Idempotency-Key), replaying what it answered."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from app.auth.principal import Principal
from app.enforcement.idempotency import IdempotencyStore, StoredResponse, fingerprint
from app.errors import AppError, IdempotencyUnavailable, InvalidRequest
from app.redis_errors import redis_errors

log = logging.getLogger(__name__)


# A shared store (Redis) that fails: never a 500, and never an answer lost for lack of bookkeeping.
def store_errors() -> tuple[type[BaseException], ...]:
    return redis_errors(OSError, TimeoutError)


_WELL_FORMED = re.compile(r"^[\x21-\x7e]{1,255}$")
# Headers worth replaying; the rest (date, request id, lengths) belong to the new response.
_REPLAYED = ("content-type", "x-pacemaker-cost-usd")


async def run_once(
    request: Request,
    principal: Principal,
    store: IdempotencyStore,
    idempotency_key: str | None,
    handle: Callable[[], Awaitable[Response]],
    render_error: Callable[[AppError], Response],
) -> Response:
    if idempotency_key is None:
        return await handle()
    if not _WELL_FORMED.match(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters.")
    try:
        claimed = await store.claim(
            f"{principal.key_id}:{idempotency_key}",
            fingerprint(request.method, request.url.path, await request.body()),
        )
    except store_errors():
        raise IdempotencyUnavailable("Idempotency keys cannot be checked right now.", retry_after=1.0) from None
    if isinstance(claimed, StoredResponse):
        headers = {**claimed.headers, "Idempotent-Replayed": "true"}
        return Response(claimed.body, status_code=claimed.status, headers=headers)
    retryable = False
    try:
        try:
            response = await handle()
        except AppError as exc:
            retryable = exc.retryable
            response = render_error(exc)
    except BaseException:
        await _quietly(store.abandon(claimed))
        raise
    if retryable or response.status_code >= 500 or not isinstance(response.body, bytes):
        # Not an answer to keep: a server fault, or a refusal that says "come back later" (a 429
        # with Retry-After); the client's retry must run again, not get this replayed for 24 h.
        await _quietly(store.abandon(claimed))
        return response
    kept = {name: response.headers[name] for name in _REPLAYED if name in response.headers}
    try:
        await store.complete(claimed, StoredResponse(response.status_code, kept, bytes(response.body)))
    except store_errors():
        # The answer was given; not keeping it only means a repeat would run again.
        log.warning("idempotency: could not keep the response for %s", idempotency_key)
        await _quietly(store.abandon(claimed))
    return response


async def _quietly(operation: Awaitable[None]) -> None:
    try:
        await operation
    except store_errors():
        log.warning("idempotency: the store did not answer; the claim expires by itself")
