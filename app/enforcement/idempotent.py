"""Runs a non-streamed request at most once per (API key, Idempotency-Key), replaying what it answered."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from app.auth.principal import Principal
from app.enforcement.idempotency import IdempotencyStore, StoredResponse, fingerprint
from app.errors import AppError, InvalidRequest

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
    claimed = await store.claim(
        f"{principal.key_id}:{idempotency_key}",
        fingerprint(request.method, request.url.path, await request.body()),
    )
    if isinstance(claimed, StoredResponse):
        headers = {**claimed.headers, "Idempotent-Replayed": "true"}
        return Response(claimed.body, status_code=claimed.status, headers=headers)
    try:
        try:
            response = await handle()
        except AppError as exc:
            response = render_error(exc)
    except BaseException:
        await store.abandon(claimed)
        raise
    if response.status_code >= 500 or not isinstance(response.body, bytes):
        # A server fault is not an answer to keep: the client's retry should run again.
        await store.abandon(claimed)
        return response
    kept = {name: response.headers[name] for name in _REPLAYED if name in response.headers}
    await store.complete(claimed, StoredResponse(response.status_code, kept, bytes(response.body)))
    return response
