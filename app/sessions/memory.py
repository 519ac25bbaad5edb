"""The in-process session pool: bounded in stored bytes, per session and in total, LRU, expiring, swept."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from app.sessions.base import Appended, SessionBusy, SessionInfo, SessionKey, SessionPage, turn_tokens
from app.sessions.metrics import SessionMetrics
from app.sessions.settings import SessionsSettings

log = logging.getLogger(__name__)

WARN_AT = 0.80  # of max_bytes: a warning, once, until the pool is below it again
EVICT_AT = 0.95  # of max_bytes: least recently used sessions go ...
EVICT_TO = 0.80  # ... until the pool is down to this


@dataclass(slots=True)
class _Session:
    created_at: float
    used_at: float
    turns: list[bytes] = field(default_factory=list)
    bytes: int = 0
    tokens: int = 0


class MemorySessionStore:
    """Sessions in an OrderedDict kept in order of last use, so the least recently used (and the first
    to expire, since the TTL counts from the last use) are at the front. Sizes are the stored bytes."""

    def __init__(
        self, settings: SessionsSettings, metrics: SessionMetrics, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._sessions: OrderedDict[SessionKey, _Session] = OrderedDict()
        self._by_key: dict[int, set[str]] = {}  # for listing a key's sessions
        self._busy: dict[SessionKey, tuple[str, float]] = {}  # task id, held until
        self.total_bytes = 0
        self._warned = False
        self._sweeper: asyncio.Task[None] | None = None

    # --- a turn -------------------------------------------------------------------------------

    async def begin(self, key: SessionKey, task_id: str, hold_s: float) -> list[bytes]:
        now = self._clock()
        held = self._busy.get(key)
        if held is not None and held[0] != task_id and held[1] > now:
            raise SessionBusy(
                f"Session {key[1]!r} has a turn running ({held[0]}); retry when it ends.",
                retry_after=self._settings.busy_retry_after_s,
                extra={"task_id": held[0]},
            )
        self._busy[key] = (task_id, now + hold_s)
        session = self._live(key, now)
        if session is None:
            self._metrics.lookups.labels("miss").inc()
            return []
        self._metrics.lookups.labels("hit").inc()
        session.used_at = now
        self._sessions.move_to_end(key)
        return list(session.turns)

    async def finish(self, key: SessionKey, task_id: str, turn: bytes) -> Appended:
        now = self._clock()
        held = self._busy.get(key)
        if held is not None and held[0] != task_id and held[1] > now:
            return Appended(False, "hold_expired")  # another turn took the session after this one's hold ran out
        self._busy.pop(key, None)
        if len(turn) > self._settings.max_session_bytes:
            return Appended(False, "turn_too_large")
        session = self._live(key, now)
        if session is None:
            session = self._sessions[key] = _Session(created_at=now, used_at=now)
            self._by_key.setdefault(key[0], set()).add(key[1])
        else:
            session.used_at = now
            self._sessions.move_to_end(key)
        session.turns.append(turn)
        session.bytes += len(turn)
        session.tokens += turn_tokens(turn)
        self.total_bytes += len(turn)
        trimmed = 0
        while session.bytes > self._settings.max_session_bytes:
            # Whole turns only, oldest first; the new turn alone fits, so it stays.
            old = session.turns.pop(0)
            session.bytes -= len(old)
            session.tokens -= turn_tokens(old)
            self.total_bytes -= len(old)
            trimmed += 1
        if trimmed:
            self._metrics.evictions.labels("size").inc(trimmed)
        self._under_pressure()
        self._gauges()
        return Appended(True, trimmed=trimmed)

    async def release(self, key: SessionKey, task_id: str) -> None:
        held = self._busy.get(key)
        if held is not None and held[0] == task_id:
            del self._busy[key]

    # --- reading and forgetting ------------------------------------------------------------

    async def read(self, key: SessionKey) -> tuple[SessionInfo, list[bytes]] | None:
        session = self._live(key, self._clock())
        if session is None:
            return None
        return _info(key[1], session), list(session.turns)

    async def page(self, key_id: int, after: str | None, limit: int) -> SessionPage:
        now = self._clock()
        ids = sorted(self._by_key.get(key_id, ()))
        start = 0 if after is None else bisect.bisect_right(ids, after)
        found: list[SessionInfo] = []
        for session_id in ids[start:]:
            session = self._live((key_id, session_id), now)
            if session is None:
                continue
            if len(found) == limit:
                return SessionPage(found, found[-1].id)
            found.append(_info(session_id, session))
        return SessionPage(found, None)

    async def delete(self, key: SessionKey) -> bool:
        held = self._busy.get(key)
        if held is not None and held[1] > self._clock():
            raise SessionBusy(
                f"Session {key[1]!r} has a turn running ({held[0]}); delete it when the turn ends.",
                retry_after=self._settings.busy_retry_after_s,
                extra={"task_id": held[0]},
            )
        existed = self._remove(key) is not None
        self._gauges()
        return existed

    # --- bounds ---------------------------------------------------------------------------------

    def _live(self, key: SessionKey, now: float) -> _Session | None:
        session = self._sessions.get(key)
        if session is not None and now - session.used_at >= self._settings.ttl_s:
            self._remove(key)
            self._metrics.evictions.labels("ttl").inc()
            self._gauges()
            return None
        return session

    def _remove(self, key: SessionKey) -> _Session | None:
        session = self._sessions.pop(key, None)
        if session is not None:
            self.total_bytes -= session.bytes
            ids = self._by_key.get(key[0])
            if ids is not None:
                ids.discard(key[1])
                if not ids:
                    del self._by_key[key[0]]
        return session

    def _under_pressure(self) -> None:
        limit = self._settings.max_bytes
        if self.total_bytes >= EVICT_AT * limit:
            evicted, freed = 0, 0
            # The session just used is the last in line, and stays: it alone is within the bound.
            while len(self._sessions) > 1 and self.total_bytes > EVICT_TO * limit:
                oldest = next(iter(self._sessions))
                removed = self._remove(oldest)
                freed += removed.bytes if removed is not None else 0
                evicted += 1
            self._metrics.evictions.labels("lru").inc(evicted)
            log.warning(
                "session pool at %d%% of sessions.max_bytes (%d): evicted the %d least recently used"
                " sessions (%d bytes)",
                round(EVICT_AT * 100),
                limit,
                evicted,
                freed,
            )
        if self.total_bytes >= WARN_AT * limit:
            if not self._warned:
                self._warned = True
                log.warning(
                    "session pool at %d%% of sessions.max_bytes (%d bytes held); at %d%% it evicts"
                    " the least recently used sessions",
                    self.total_bytes * 100 // limit,
                    limit,
                    round(EVICT_AT * 100),
                )
        else:
            self._warned = False

    def sweep(self) -> int:
        """Remove every expired session (they are at the front) and lapsed holds; how many sessions went."""
        now = self._clock()
        expired = 0
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if now - session.used_at < self._settings.ttl_s:
                break
            self._remove(key)
            expired += 1
        for key in [key for key, (_task, until) in self._busy.items() if until <= now]:
            del self._busy[key]
        if expired:
            self._metrics.evictions.labels("ttl").inc(expired)
            self._gauges()
        return expired

    def __len__(self) -> int:
        return len(self._sessions)

    def _gauges(self) -> None:
        self._metrics.bytes.set(self.total_bytes)
        self._metrics.sessions.set(len(self._sessions))

    # --- lifetime -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")

    async def check(self) -> str | None:
        return None  # in process: nothing that can be down

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_interval_s)
            try:
                self.sweep()
            except Exception:  # a bug here must not end the sweeping
                log.exception("session sweep failed")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


def _info(session_id: str, session: _Session) -> SessionInfo:
    return SessionInfo(
        id=session_id,
        turns=len(session.turns),
        tokens=session.tokens,
        bytes=session.bytes,
        created_at=session.created_at,
        last_used_at=session.used_at,
    )
