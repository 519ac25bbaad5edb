"""Resolves a presented API key to a Principal, with a bounded TTL cache in front of the database."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from app.auth.keys import hash_key
from app.auth.principal import KeyLimits, Principal
from app.auth.repository import ApiKeyRepository
from app.db import SessionMaker
from app.errors import AuthUnavailable, Unauthenticated

# Unknown keys are remembered too (briefly), so a flood of bad keys costs no database reads.
NEGATIVE_TTL_FRACTION = 0.2


class LookupGuard(Protocol):
    """Per client address, what may cost a key lookup (the edge limits, app/edge/limiter.py)."""

    def lookup_started(self, address: str) -> None:
        """Before a lookup of a key not known good; raises an AppError to refuse it."""

    def lookup_ended(self, address: str) -> None: ...

    async def auth_failed(self, address: str) -> None: ...


class Authenticator:
    def __init__(
        self,
        session_maker: SessionMaker,
        *,
        cache_seconds: float,
        cache_size: int,
        lookup_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        guard: LookupGuard | None = None,
    ) -> None:
        self._session_maker = session_maker
        self._guard = guard
        self._lookup_timeout_s = lookup_timeout_s
        self._ttl = cache_seconds
        self._size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, presented: str | None, *, client: str | None = None) -> Principal:
        """The key's Principal; `client` (the caller's address) puts the lookup under the guard, if any."""
        if not presented:
            await self._failed(client)
            raise Unauthenticated("Send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")
        key_hash = hash_key(presented)
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            # A key known good (its entry expired) is looked up again whatever its address did.
            gated = client if cached is None or cached[0] is None else None
            principal = await self._load_once(key_hash, now, gated)
        if principal is None:
            await self._failed(client)
            raise Unauthenticated("The API key is not valid or has been revoked.")
        return principal

    async def _failed(self, client: str | None) -> None:
        if self._guard is not None and client is not None:
            await self._guard.auth_failed(client)

    def knows(self, presented: str | None) -> bool:
        """Whether the key is known good here (in the cache, expired or not): serving it costs at most a refresh."""
        if not presented:
            return False
        cached = self._cache.get(hash_key(presented))
        return cached is not None and cached[0] is not None

    async def _load_once(self, key_hash: str, now: float, gated: str | None = None) -> Principal | None:
        """One database read per key however many requests miss the cache at once (an expiry under load).

        `gated`: the address whose lookup the guard admits first (only the one that reads, not its waiters).
        """
        pending = self._loading.get(key_hash)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request itself is cancelled
                # The request that was reading the key was cancelled (a socket closing), not this one: read it
                # here (through the guard, as any first reader), rather than end an innocent request with a 500.
                return await self._load_once(key_hash, now, gated)
        if gated is not None and self._guard is not None:
            self._guard.lookup_started(gated)  # may refuse: no future made, nothing to undo
        pending = asyncio.get_running_loop().create_future()
        self._loading[key_hash] = pending
        try:
            principal = await self._load(key_hash)
        except asyncio.CancelledError:
            pending.cancel()  # the waiters read the key themselves (above)
            raise
        except Exception as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved here, so no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._loading[key_hash]
            if gated is not None and self._guard is not None:
                self._guard.lookup_ended(gated)
        ttl = self._ttl if principal is not None else self._ttl * NEGATIVE_TTL_FRACTION
        self._remember(key_hash, principal, now + ttl)
        pending.set_result(principal)
        return principal

    async def _load(self, key_hash: str) -> Principal | None:
        try:
            # Bounded: a frozen database once held requests for 25 s; better a quick 503 to retry.
            async with asyncio.timeout(self._lookup_timeout_s), self._session_maker() as session:
                row = await ApiKeyRepository(session).find_active_by_hash(key_hash)
        except TimeoutError:
            raise AuthUnavailable(
                f"The key store did not answer within {self._lookup_timeout_s:g} s; retry shortly.", retry_after=1.0
            ) from None
        except (OSError, SQLAlchemyError) as exc:
            raise AuthUnavailable(
                f"The key store did not answer ({type(exc).__name__}); retry shortly.", retry_after=1.0
            ) from None
        if row is None or row.id is None:
            return None
        return Principal(
            key_id=row.id,
            name=row.name,
            prefix=row.prefix,
            limits=KeyLimits.of(row),
            is_admin=row.is_admin,
            allowed_tools=frozenset(row.allowed_tools) if row.allowed_tools is not None else None,
            sandbox_max=row.sandbox_limits,
        )

    def _remember(self, key_hash: str, principal: Principal | None, expires: float) -> None:
        if self._ttl <= 0:
            return
        self._cache[key_hash] = (principal, expires)
        self._cache.move_to_end(key_hash)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return x_api_key.strip() if x_api_key else None
