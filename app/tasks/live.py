"""The events of a background task running on this instance, for the followers here: no storage round trip.

With the Redis event log, events reach Redis in batches (every ~25 ms); a follower on the instance
that runs the task (its creator's own stream, most of all) reads them from here the moment they are
made. Kept only while the task runs; afterwards followers read the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.tasks.events import LoggedEvent


class LiveEvents:
    def __init__(self) -> None:
        self.events: list[LoggedEvent] = []  # seq n is events[n - 1]: seqs are 1..N without gaps
        self.done = False
        self._changed = asyncio.Event()

    def add(self, event: LoggedEvent) -> None:
        self.events.append(event)
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    async def follow(self, after: int) -> AsyncIterator[LoggedEvent]:
        """Events with seq > after, then each new one, until the last (the terminal event) is out."""
        index = max(0, after)
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.done:
                return
            await self._changed.wait()

    def _wake(self) -> None:
        # One event object per change: every waiter wakes, and the next wait is on a fresh one.
        self._changed.set()
        self._changed = asyncio.Event()
