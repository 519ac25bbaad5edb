"""The edge's counters in Redis: limits' RedisStorage, with window ends to the millisecond, counting on
the limiter's script client where it serves the URL.

Imported only when the edge counts in Redis (app/edge/limiter.py: build_edge), like redis itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from limits.aio.storage import RedisStorage

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from app.enforcement.redis_wire import RespScripts


class RedisWindows(RedisStorage):
    """limits' RedisStorage on our own client's pool, reading when a window ends with PTTL.

    limits reads it with TTL, whole seconds rounded to the nearest: a window with 2.3 s left was said
    to end in 2 s, so a client that waited its Retry-After came back while the window was still full,
    and was refused again (a new block, and a new audit row).

    With `scripts` (app/enforcement/redis_wire.py), the count every request makes runs limits' own
    script there: through redis-py it was 3 % of a chat request's CPU, and the client's round trip one
    of three per request. Owns both clients: aclose() closes them.
    """

    STORAGE_SCHEME = None  # type: ignore[assignment]  # built by the edge only, never from a storage URI

    def __init__(self, client: Redis, key_prefix: str, scripts: RespScripts | None = None) -> None:
        # The URL is the pool's; limits only needs to be told it is a Redis (redis-py's asyncio client).
        super().__init__(
            "async+redis://",
            implementation="redispy",
            key_prefix=key_prefix,
            connection_pool=client.connection_pool,  # type: ignore[arg-type]  # limits types options as scalars only
        )
        self._client = client
        self._key_prefix = key_prefix
        self._scripts = scripts
        self._incr_expire = None if scripts is None else scripts.script(self.bridge.SCRIPT_INCR_EXPIRE)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        if self._incr_expire is None:
            return await super().incr(key, expiry, amount)
        return int(await self._incr_expire(keys=[f"{self._key_prefix}:{key}"], args=[expiry, amount]))

    async def aclose(self) -> None:
        if self._scripts is not None:
            await self._scripts.aclose()
        await self._client.aclose()

    async def get_expiry(self, key: str) -> float:
        left_ms = await self._client.pttl(f"{self._key_prefix}:{key}")  # the key as limits names it
        return max(int(left_ms), 0) / 1000 + time.time()
