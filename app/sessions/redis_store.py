"""The Redis session store, shared by every instance: one hash per session, each step one Lua script."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.sessions.base import Appended, SessionBusy, SessionInfo, SessionKey, SessionPage, SessionUnavailable
from app.sessions.metrics import SessionMetrics
from app.sessions.redis_scripts import BEGIN_LUA, DELETE_LUA, FINISH_LUA, PAGE_LUA, RELEASE_LUA
from app.sessions.settings import SessionsSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
_META = frozenset({b"c", b"u", b"h", b"n", b"b", b"k", b"l"})


class RedisSessionStore:
    """Keys live under `{prefix}:{{key_id}}:...`: the hash tag keeps one API key's sessions in one
    cluster slot. The client is owned: aclose() closes it."""

    def __init__(self, redis: Redis, settings: SessionsSettings, metrics: SessionMetrics) -> None:
        self._redis = redis
        self._settings = settings
        self._metrics = metrics
        self._ttl_ms = max(1, math.ceil(settings.ttl_s * 1000))
        self._begin = redis.register_script(BEGIN_LUA)
        self._finish = redis.register_script(FINISH_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._delete = redis.register_script(DELETE_LUA)
        self._page = redis.register_script(PAGE_LUA)

    def keys_for(self, key: SessionKey) -> list[str]:
        """The session's hash, its busy mark, and its key's two index sets."""
        base = f"{self._settings.redis_prefix}:{{{key[0]}}}"
        return [f"{base}:s:{key[1]}", f"{base}:busy:{key[1]}", f"{base}:ids", f"{base}:expiries"]

    async def begin(self, key: SessionKey, task_id: str, hold_s: float) -> list[bytes]:
        hold_ms = max(1, math.ceil(hold_s * 1000))
        reply = await _call(self._begin(keys=self.keys_for(key), args=[task_id, hold_ms, self._ttl_ms, key[1]]))
        if reply[0] == b"busy":
            holder = reply[1].decode()
            raise SessionBusy(
                f"Session {key[1]!r} has a turn running ({holder}); retry when it ends.",
                retry_after=self._settings.busy_retry_after_s,
                extra={"task_id": holder},
            )
        turns: list[bytes] = reply[1:]
        self._metrics.lookups.labels("hit" if turns else "miss").inc()
        return turns

    async def finish(self, key: SessionKey, task_id: str, turn: bytes) -> Appended:
        args: list[bytes | str | int] = [task_id, turn, self._settings.max_session_bytes, self._ttl_ms, key[1]]
        for attempt in (1, 2):
            try:
                reply = await _call(self._finish(keys=self.keys_for(key), args=args))
                break
            except SessionUnavailable as exc:
                # Once more after a timeout: the script appends a task's turn once, even if the first
                # call ran and only its answer was late (connection errors are retried by the client).
                if attempt == 1 and isinstance(exc.__cause__, TimeoutError | RedisTimeoutError):
                    continue
                log.warning(
                    "session %s of key %d: the turn of %s could not be stored (%s)",
                    key[1],
                    key[0],
                    task_id,
                    type(exc.__cause__).__name__,
                )
                return Appended(False, "store_unavailable")
        outcome, trimmed = reply[0].decode(), int(reply[1])
        if outcome != "ok":
            return Appended(False, "hold_expired" if outcome == "hold_expired" else "turn_too_large")
        if trimmed:
            self._metrics.evictions.labels("size").inc(trimmed)
        return Appended(True, trimmed=trimmed)

    async def release(self, key: SessionKey, task_id: str) -> None:
        with contextlib.suppress(SessionUnavailable):  # the hold ends on its own within the task's timeout
            await _call(self._release(keys=self.keys_for(key)[1:2], args=[task_id]))

    async def read(self, key: SessionKey) -> tuple[SessionInfo, list[bytes]] | None:
        stored = await _call(self._redis.hgetall(self.keys_for(key)[0]))
        if b"h" not in stored:
            return None
        # The client does not decode (bytes in, bytes out), whatever its stubs say.
        numbered = sorted((int(field), value) for field, value in stored.items() if field not in _META)
        turns: list[bytes] = [value for _number, value in numbered]  # type: ignore[misc]
        return _info(key[1], stored), turns

    async def page(self, key_id: int, after: str | None, limit: int) -> SessionPage:
        _, _, ids_key, expiries_key = self.keys_for((key_id, ""))
        ids = [
            raw.decode() for raw in await _call(self._page(keys=[ids_key, expiries_key], args=[after or "", limit + 1]))
        ]
        more, ids = len(ids) > limit, ids[:limit]
        pipe = self._redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.hmget(self.keys_for((key_id, session_id))[0], ["c", "u", "b", "k", "h", "n"])
        rows: list[list[bytes | None]] = await _call(pipe.execute()) if ids else []
        found = []
        for session_id, row in zip(ids, rows, strict=True):
            if row[4] is None:
                continue  # expired (or evicted by Redis) since the index last saw it
            meta = dict(zip((b"c", b"u", b"b", b"k", b"h", b"n"), row, strict=True))
            found.append(_info(session_id, {name: value for name, value in meta.items() if value is not None}))
        return SessionPage(found, ids[-1] if more and ids else None)

    async def delete(self, key: SessionKey) -> bool:
        reply = await _call(self._delete(keys=self.keys_for(key), args=[key[1]]))
        if reply[0] == b"busy":
            holder = reply[1].decode()
            raise SessionBusy(
                f"Session {key[1]!r} has a turn running ({holder}); delete it when the turn ends.",
                retry_after=self._settings.busy_retry_after_s,
                extra={"task_id": holder},
            )
        return bool(int(reply[1]))

    async def start(self) -> None:
        """Nothing to start: scripts are loaded on first use (EVALSHA, then SCRIPT LOAD if missing)."""

    async def check(self) -> str | None:
        try:
            await self._redis.ping()
        except Exception as exc:  # any failure is the answer: the check reports it
            return f"error: {type(exc).__name__}"
        return "ok"

    async def aclose(self) -> None:
        await self._redis.aclose()


async def _call(call: Awaitable[T]) -> T:
    try:
        return await call
    except (RedisError, OSError, TimeoutError) as exc:
        raise SessionUnavailable(
            f"The session store did not answer ({type(exc).__name__}); retry shortly.", retry_after=1.0
        ) from exc


def _info(session_id: str, stored: Mapping[Any, Any]) -> SessionInfo:
    return SessionInfo(
        id=session_id,
        turns=int(stored[b"n"]) - int(stored[b"h"]),
        tokens=int(stored[b"k"]),
        bytes=int(stored[b"b"]),
        created_at=int(stored[b"c"]) / 1000,
        last_used_at=int(stored[b"u"]) / 1000,
    )
