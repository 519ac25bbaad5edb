"""In-flight request caps: one for the whole instance, one per key. A stream holds its slot to the end."""

from __future__ import annotations

from app.errors import ConcurrencyLimitExceeded, Overloaded, TooManySockets

# Slots free up as requests finish, usually within a second or two; a client should not hammer.
RETRY_AFTER_S = 1.0


class ConcurrencyLimiter:
    def __init__(self, global_max: int) -> None:
        self.global_max = global_max
        self.in_flight = 0
        self._per_key: dict[int, int] = {}

    def acquire(self, key_id: int, key_max: int) -> Slot:
        if self.in_flight >= self.global_max:
            raise Overloaded(
                f"This instance has {self.global_max} requests in flight; try again shortly.",
                retry_after=RETRY_AFTER_S,
            )
        held = self._per_key.get(key_id, 0)
        if held >= key_max:
            raise ConcurrencyLimitExceeded(
                f"This key already has {held} requests in flight (limit {key_max}).", retry_after=RETRY_AFTER_S
            )
        self.in_flight += 1
        self._per_key[key_id] = held + 1
        return Slot(self, key_id)

    def _release(self, key_id: int) -> None:
        self.in_flight -= 1
        left = self._per_key[key_id] - 1
        if left:
            self._per_key[key_id] = left
        else:
            del self._per_key[key_id]  # idle keys leave no state behind


class Slot:
    __slots__ = ("_key_id", "_limiter", "_released")

    def __init__(self, limiter: ConcurrencyLimiter, key_id: int) -> None:
        self._limiter = limiter
        self._key_id = key_id
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._key_id)


class SocketLimiter:
    """Open WebSockets per key, per instance: a socket holds its slot until it closes.

    Without it one key could hold thousands of idle sockets (and their file descriptors).
    """

    def __init__(self) -> None:
        self._per_key: dict[int, int] = {}

    def open(self, key_id: int, key_max: int) -> SocketSlot:
        held = self._per_key.get(key_id, 0)
        if held >= key_max:
            raise TooManySockets(
                f"This key already has {held} WebSockets open (limit {key_max}); close one first.",
                retry_after=RETRY_AFTER_S,
            )
        self._per_key[key_id] = held + 1
        return SocketSlot(self, key_id)

    def open_for(self, key_id: int) -> int:
        return self._per_key.get(key_id, 0)

    def open_total(self) -> int:
        return sum(self._per_key.values())

    def _close(self, key_id: int) -> None:
        left = self._per_key[key_id] - 1
        if left:
            self._per_key[key_id] = left
        else:
            del self._per_key[key_id]


class SocketSlot:
    __slots__ = ("_closed", "_key_id", "_limiter")

    def __init__(self, limiter: SocketLimiter, key_id: int) -> None:
        self._limiter = limiter
        self._key_id = key_id
        self._closed = False

    def release(self) -> None:
        if not self._closed:
            self._closed = True
            self._limiter._close(self._key_id)
