"""What the edge counts per client address, and which addresses are over a limit.

An address is counted as itself for IPv4, and for IPv6 as its network of `server.edge.ipv6_prefix`
bits (a /64 by default: one host usually holds a whole /64, and could otherwise take a fresh address,
with a fresh allowance, for each request); an IPv4-mapped IPv6 address counts as its IPv4 address.

Two fixed-window limits (`limits` items): every request (`server.edge.rate`) and every failed
authentication (`server.edge.failed_auth`). An address over either is *blocked* until its window
ends; the block is held in process, so a flood from a blocked address costs a dictionary lookup
per request and no call to Redis. While blocked, only requests whose key this instance already
knows get through (app/edge/middleware.py): they cost no key lookup.

Key lookups of keys not known good also pass a gate (`lookup_started` / `lookup_ended`, called by
the authenticator): an address may have at most `failed_auth` of them failed or in flight in a
window, so a burst of concurrent bad keys, all sent before the first fails, cannot cost more
lookups than the limit either.

The counters live in process (app/edge/storage.py) or, with `limits.redis_url`, in Redis through
`limits`' RedisStorage, shared by every instance. Redis failing must not turn into an outage: the
edge then counts in process (fail-open, with the same limits per instance), logs once per outage,
counts pacemaker_edge_backend_errors_total, and tries Redis again after a one-second cool-down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from limits.aio.storage import Storage

from app.edge.metrics import EdgeMetrics
from app.edge.settings import EdgeSettings, rate_item
from app.edge.storage import BoundedMemoryStorage
from app.enforcement.outage import Outage
from app.errors import EdgeRateLimited
from app.redis_errors import backend_errors

if TYPE_CHECKING:
    from app.edge.redis_storage import RedisWindows

log = logging.getLogger(__name__)

RATE, FAILED_AUTH = "rate", "failed_auth"
_DETAIL = {
    RATE: "Too many requests from this address; retry after the time in Retry-After.",
    FAILED_AUTH: "Too many failed authentications from this address; retry after the time in Retry-After"
    " with a valid key.",
}


@lru_cache(maxsize=4096)
def counted_as(address: str, ipv6_prefix: int = 64) -> str:
    """What an address is counted as: an IPv4 address as it is, an IPv6 one as its /`ipv6_prefix` network.

    One IPv6 host usually holds a whole /64: counted address by address, each request could come from
    a new address with a fresh allowance. An IPv4-mapped address is its IPv4 address; anything that is
    not an IP address (a proxy's "unknown") is counted as the text it is.
    """
    if ":" not in address:
        return address  # IPv4 (or not an address): the common case costs nothing more
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    host_bits = 128 - ipv6_prefix
    network = ipaddress.IPv6Address(int(ip) >> host_bits << host_bits)
    return f"{network}/{ipv6_prefix}"


@dataclass(slots=True)
class Block:
    """An address over a limit until `until` (monotonic)."""

    until: float
    reason: str
    audited: bool = False  # its first refusal has had its audit row

    def refusal(self, now: float) -> EdgeRateLimited:
        return EdgeRateLimited(_DETAIL[self.reason], retry_after=max(self.until - now, 0.0))


class EdgeLimiter:
    """The edge's counters and blocks. `shared` is limits' RedisStorage (None: in process only)."""

    def __init__(
        self,
        settings: EdgeSettings,
        metrics: EdgeMetrics,
        *,
        shared: Storage | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        cooldown_s: float = 1.0,
    ) -> None:
        self.rate = rate_item(settings.rate)
        self.failed_auth = rate_item(settings.failed_auth)
        self.metrics = metrics
        self._rate_amount = self.rate.amount
        self._rate_expiry = self.rate.get_expiry()
        self._failed_amount = self.failed_auth.amount
        self._failed_expiry = self.failed_auth.get_expiry()
        self._max = settings.max_addresses
        self._ipv6_prefix = settings.ipv6_prefix
        self.clock = clock  # monotonic: blocks end by it
        self._wall = wall
        # Both counters of an address, in process: the only ones without Redis, the fallback with it.
        self._local = BoundedMemoryStorage(2 * settings.max_addresses, clock=wall)
        self._shared = shared
        self._outage = Outage(clock, cooldown_s)
        self._blocked: OrderedDict[str, Block] = OrderedDict()
        # Failed authentications of an address in its current window, as last counted: (count, window end).
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._pending: dict[str, int] = {}  # lookups in flight per address (of keys not known good)
        self._counting: set[asyncio.Task[None]] = set()  # admit_later()'s counts in flight

    @property
    def shared(self) -> bool:
        return self._shared is not None

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down and the edge counts in process."""
        return self._outage.down

    # ---- every request

    async def admit(self, address: str) -> Block | None:
        """Count a request of `address`: None if it is within the limits, else the address's block."""
        address = counted_as(address, self._ipv6_prefix)
        block = self._blocked.get(address)
        if block is not None:
            now = self.clock()
            if block.until > now:
                return block
            del self._blocked[address]
        key = "r:" + address
        if self._shared is None:
            count = self._local.incr_now(key, self._rate_expiry)
        else:
            count = await self._incr(key, self._rate_expiry)
        if count <= self._rate_amount:
            return None
        return self._block(address, await self._window_end(key), RATE)

    def admit_later(self, address: str) -> None:
        """admit() without waiting for its answer, for a request served whatever it says (its key is
        known good here): with Redis, a round trip less on the request's way. An address it puts over
        a limit is blocked for the requests after it all the same."""
        task = asyncio.get_running_loop().create_task(self._admit_known(address))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _admit_known(self, address: str) -> None:
        if await self.admit(address) is not None:
            self.metrics.known_key.inc()

    async def counted(self) -> None:
        """Wait for the counts admit_later() started (before the storage closes)."""
        if self._counting:
            await asyncio.gather(*self._counting, return_exceptions=True)

    # ---- failed authentications (the authenticator calls these: app/auth/authenticator.py)

    def lookup_started(self, address: str) -> None:
        """Before a key lookup of a key not known good: refused (EdgeRateLimited) past the failed_auth limit."""
        address = counted_as(address, self._ipv6_prefix)
        now = self.clock()
        failed = self._failures_now(address, now)
        pending = self._pending.get(address, 0)
        if failed + pending >= self._failed_amount:
            self.metrics.refusals.labels(FAILED_AUTH).inc()
            # Blocked from here on, so that the rest of a burst is refused at the edge (no routing, no
            # row each): until the failures' window ends, or for a second if lookups in flight filled it.
            ends = self._failures[address][1] if failed else now
            raise self._block_until(address, max(ends, now + 1.0), FAILED_AUTH).refusal(now)
        self._pending[address] = pending + 1

    def lookup_ended(self, address: str) -> None:
        address = counted_as(address, self._ipv6_prefix)
        pending = self._pending.get(address, 0) - 1
        if pending > 0:
            self._pending[address] = pending
        else:
            self._pending.pop(address, None)

    async def auth_failed(self, address: str) -> None:
        """Count a failed authentication of `address`; at the limit, block it for the rest of the window."""
        address = counted_as(address, self._ipv6_prefix)
        now = self.clock()
        failed = self._failures_now(address, now)
        ends = self._failures[address][1] if failed else now + self._failed_expiry
        # Counted here before any wait, so that the gate never sees this failure neither pending nor counted.
        self._remember_failures(address, failed + 1, ends)
        key = "f:" + address
        if self._shared is None:
            counted = self._local.incr_now(key, self._failed_expiry)
        else:
            counted = await self._incr(key, self._failed_expiry)
        failed = max(counted, self._failures_now(address, now))
        if failed < self._failed_amount:
            self._remember_failures(address, failed, ends)
            return
        block = self._block(address, await self._window_end(key), FAILED_AUTH)
        self._remember_failures(address, failed, block.until)

    # ---- state

    def _failures_now(self, address: str, now: float) -> int:
        entry = self._failures.get(address)
        if entry is None:
            return 0
        if entry[1] <= now:
            del self._failures[address]
            return 0
        return entry[0]

    def _remember_failures(self, address: str, count: int, ends: float) -> None:
        failures = self._failures
        if address not in failures and len(failures) >= self._max:
            failures.popitem(last=False)
        failures[address] = (count, ends)

    def _block(self, address: str, window_end: float, reason: str) -> Block:
        """Block `address` until the window that ends at `window_end` (wall clock) is over."""
        return self._block_until(address, self.clock() + max(window_end - self._wall(), 0.0), reason)

    def _block_until(self, address: str, until: float, reason: str) -> Block:
        now = self.clock()
        blocked = self._blocked
        block = blocked.get(address)
        if block is not None and block.until > now:
            if until > block.until:
                block.until, block.reason = until, reason
            return block
        if len(blocked) >= self._max:
            blocked.popitem(last=False)
        block = blocked[address] = Block(until, reason)
        return block

    # ---- the shared counters, failing open

    async def _incr(self, key: str, expiry: int) -> int:
        shared = self._shared
        if shared is not None and self._outage.may_try():
            probe = self._outage.start_probe()
            try:
                count = await shared.incr(key, expiry)
            except backend_errors() as exc:
                self._backend_failed(exc)
            else:
                self._answered()
                return count
            finally:
                self._outage.end_probe(probe)
        return self._local.incr_now(key, expiry)

    async def _window_end(self, key: str) -> float:
        shared = self._shared
        if shared is not None and self._outage.may_try():
            probe = self._outage.start_probe()
            try:
                ends = await shared.get_expiry(key)
            except backend_errors() as exc:
                self._backend_failed(exc)
            else:
                self._answered()
                return ends
            finally:
                self._outage.end_probe(probe)
        return self._local.expiry_now(key)

    def _backend_failed(self, exc: BaseException) -> None:
        self.metrics.backend_errors.inc()
        if self._outage.failed():
            log.warning(
                "edge limits: Redis unavailable (%s: %s); counting per address in process until it answers",
                type(exc).__name__,
                exc,
            )

    def _answered(self) -> None:
        if self._outage.answered():
            # The outage's counts were this instance's alone; Redis has everyone's again.
            self._local = BoundedMemoryStorage(2 * self._max, clock=self._wall)
            log.info("edge limits: Redis is answering again")


def build_edge(
    settings: EdgeSettings, redis_url: str | None, metrics: EdgeMetrics
) -> tuple[EdgeLimiter, RedisWindows | None]:
    """The edge limiter, counting in the Redis of `redis_url` (storage auto) or in process; and the storage to close.

    Redis through limits' RedisStorage (app/edge/redis_storage.py) on clients of our own, built as the
    key limiter's are (the count on the script client where it serves the URL; calls time out after
    250 ms): a slow Redis costs a request at most that.
    """
    if redis_url is None or settings.storage == "memory":
        return EdgeLimiter(settings, metrics), None
    from app.edge.redis_storage import RedisWindows
    from app.enforcement.redis_limiter import build_redis, limiter_scripts  # redis: only when configured

    storage = RedisWindows(build_redis(redis_url), settings.redis_prefix, scripts=limiter_scripts(redis_url))
    return EdgeLimiter(settings, metrics, shared=storage), storage
