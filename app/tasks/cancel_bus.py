"""Cancel requests for tasks that may run on another instance: Redis pub/sub when configured, else in process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.redis_errors import redis_errors

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

CHANNEL = "pacemaker:tasks:cancel"
_RETRY_S = 1.0


class CancelBus:
    """`request(task_id)` ends the task wherever it runs: here at once, elsewhere through the channel,
    which every instance listens to and answers by cancelling the task if it is one of its own."""

    def __init__(self, redis: Redis | None, cancel_here: Callable[[str], bool]) -> None:
        self._redis = redis
        self._cancel_here = cancel_here
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._redis is not None:
            self._listener = asyncio.create_task(self._listen(self._redis), name="task-cancel-listener")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def request(self, task_id: str) -> bool:
        """True when the task ran here (and is ending); else the request went to the other instances."""
        if self._cancel_here(task_id):
            return True
        if self._redis is not None:
            await self._redis.publish(CHANNEL, task_id)
        return False

    async def _listen(self, redis: Redis) -> None:
        down = False
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    if down:
                        log.info("task cancel channel: listening again")
                        down = False
                    while True:
                        message = await pubsub.get_message(timeout=5.0)
                        if message is not None and isinstance(message.get("data"), bytes | str):
                            data = message["data"]
                            self._cancel_here(data.decode() if isinstance(data, bytes) else data)
            except redis_errors(OSError) as exc:
                if not down:
                    # Cancels sent meanwhile from other instances are lost; the lease sweep still ends
                    # tasks whose instance dies, and a cancel sent to this instance works regardless.
                    log.warning("task cancel channel unavailable (%s); retrying", type(exc).__name__)
                    down = True
                await asyncio.sleep(_RETRY_S)
