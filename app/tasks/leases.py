"""Leases of the tasks this instance runs, and the sweep that ends those whose instance died.

Every `tasks.lease_renew_s` the instance renews the leases of its running tasks (to now
+ `tasks.lease_s`) and claims the tasks whose lease has lapsed: their instance is gone (kill -9, a
lost node), so they end as failed (`worker_lost`). A lost task is never run again on its own: that
would bill twice. The sweep waits until the database has answered for a whole lease period, so that
an outage, during which nobody could renew, does not look like every instance dying at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime, timedelta

from app.tasks.models import TaskRecord
from app.tasks.store import TaskStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        store: TaskStore,
        *,
        lease_s: float,
        renew_s: float,
        running: Callable[[], Collection[str]],
        on_lost: Callable[[TaskRecord], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._lease_s = lease_s
        self._renew_s = renew_s
        self._running = running
        self._on_lost = on_lost
        self._clock = clock
        self._answering_since: float | None = None  # when the database last came back, by this clock
        self._loop: asyncio.Task[None] | None = None

    def lease_until(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self._lease_s)

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="task-leases")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def tick(self) -> None:
        """One round: renew ours, then (if the database has been answering long enough) sweep."""
        try:
            running = list(self._running())
            if running:
                await self._store.renew_leases(running, self.lease_until())
            else:
                await self._store.get("task_lease_probe")  # no lease to renew: a key read tells if it answers
        except Exception as exc:  # a database that does not answer: try again next round
            if self._answering_since is not None:
                log.warning("task leases: the database did not answer (%s)", type(exc).__name__)
            self._answering_since = None
            return
        now = self._clock()
        if self._answering_since is None:
            self._answering_since = now
        if now - self._answering_since < self._lease_s:
            return
        try:
            lost = await self._store.claim_expired(datetime.now(UTC), timedelta(0))
        except Exception as exc:
            log.warning("task leases: the sweep failed (%s)", type(exc).__name__)
            return
        for record in lost:
            log.warning("task %s: its instance %s is gone; ended as worker_lost", record.id, record.instance_id)
            try:
                await self._on_lost(record)
            except Exception:
                log.exception("task %s: ending it as worker_lost failed", record.id)

    async def _run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self._renew_s)
