"""Idempotency-Key: a repeated request gets the stored response instead of running (and paying) again.

Scoped per API key and kept 24 h. The first request claims the key; a repeat while it runs waits
for it (up to `wait_s`) or gets 409; a repeat with a different body gets 422. Responses with a 5xx
status are not kept, so the client's retry runs again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from app.errors import IdempotencyConflict, IdempotencyInProgress

if TYPE_CHECKING:
    from redis.asyncio import Redis

TTL_S = 24 * 3600
# A claim outlives its request only by this much: an instance that dies mid-run does not block the
# key for a day (tasks are bounded by agent.max... timeouts well below it).
CLAIM_TTL_S = 3600
POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to run the request under this key; complete() or abandon() it."""

    store_key: str
    fingerprint: str


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"%s %s\n%s" % (method.encode(), path.encode(), body)).hexdigest()


class IdempotencyStore(Protocol):
    async def claim(self, store_key: str, fingerprint: str) -> Claim | StoredResponse: ...
    async def complete(self, claim: Claim, response: StoredResponse) -> None: ...
    async def abandon(self, claim: Claim) -> None: ...


def _conflict() -> IdempotencyConflict:
    return IdempotencyConflict("This Idempotency-Key was already used with a different request body.")


def _in_progress() -> IdempotencyInProgress:
    return IdempotencyInProgress("A request with this Idempotency-Key is still running.", retry_after=1.0)


class MemoryIdempotencyStore:
    def __init__(
        self, *, wait_s: float = 10.0, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ):
        self.wait_s = wait_s
        self._max = max_entries
        self._clock = clock
        # store_key -> (fingerprint, response or None while running, expires_at, done event)
        self._entries: OrderedDict[str, tuple[str, StoredResponse | None, float, asyncio.Event]] = OrderedDict()

    async def claim(self, store_key: str, fingerprint: str) -> Claim | StoredResponse:
        now = self._clock()
        entry = self._entries.get(store_key)
        if entry is not None and entry[2] <= now:
            del self._entries[store_key]
            entry = None
        if entry is None:
            self._entries[store_key] = (fingerprint, None, now + TTL_S, asyncio.Event())
            self._evict()
            return Claim(store_key, fingerprint)
        if entry[0] != fingerprint:
            raise _conflict()
        if entry[1] is not None:
            return entry[1]
        try:
            async with asyncio.timeout(self.wait_s):
                await entry[3].wait()
        except TimeoutError:
            raise _in_progress() from None
        return await self.claim(store_key, fingerprint)  # stored, or abandoned: claim anew

    async def complete(self, claim: Claim, response: StoredResponse) -> None:
        entry = self._entries.get(claim.store_key)
        if entry is None:
            return
        self._entries[claim.store_key] = (claim.fingerprint, response, entry[2], entry[3])
        entry[3].set()

    async def abandon(self, claim: Claim) -> None:
        entry = self._entries.pop(claim.store_key, None)
        if entry is not None:
            entry[3].set()

    def _evict(self) -> None:
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class RedisIdempotencyStore:
    """The same contract over Redis, so a repeat reaching another instance gets the same answer."""

    def __init__(self, redis: Redis, *, prefix: str = "pacemaker:idem", wait_s: float = 10.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self.wait_s = wait_s

    async def claim(self, store_key: str, fingerprint: str) -> Claim | StoredResponse:
        key = f"{self._prefix}:{store_key}"
        running = orjson.dumps({"fp": fingerprint})
        deadline = time.monotonic() + self.wait_s
        while True:
            if await self._redis.set(key, running, nx=True, ex=CLAIM_TTL_S):
                return Claim(store_key, fingerprint)
            raw = await self._redis.get(key)
            if raw is None:
                continue  # abandoned or expired in between: try to claim again
            entry = orjson.loads(raw)
            if entry["fp"] != fingerprint:
                raise _conflict()
            if "status" in entry:
                return StoredResponse(entry["status"], entry["headers"], base64.b64decode(entry["body"]))
            if time.monotonic() >= deadline:
                raise _in_progress()
            await asyncio.sleep(POLL_S)

    async def complete(self, claim: Claim, response: StoredResponse) -> None:
        entry = {
            "fp": claim.fingerprint,
            "status": response.status,
            "headers": response.headers,
            "body": base64.b64encode(response.body).decode(),
        }
        await self._redis.set(f"{self._prefix}:{claim.store_key}", orjson.dumps(entry), ex=TTL_S)

    async def abandon(self, claim: Claim) -> None:
        await self._redis.delete(f"{self._prefix}:{claim.store_key}")
