"""The activity feed: each instance's report is shared through Redis each second, merged, and sent to sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from app.audit.repository import AuditRepository
from app.observability.activity import Activity
from app.observability.activity_merge import instance_report, merge
from app.redis_errors import redis_errors

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from app.resources import Resources

log = logging.getLogger(__name__)

# Put in a socket's outbox instead of a snapshot: its writer takes the newest one when it gets there,
# so a client that falls behind gets the latest snapshot, never a queue of old ones.
SNAPSHOT_DUE = b"\x00activity.snapshot"
INSTANCES_KEY = "pacemaker:activity:instances"  # hash: instance id -> its latest report (JSON)
COST_KEY = "pacemaker:activity:cost:"  # + UTC day: hash of model -> cost that day, over every instance
STALE_S = 5.0  # a report older than this is from an instance that stopped or cannot reach Redis
FORGET_S = 60.0  # ... and is removed after this long
REDIS_TIMEOUT_S = 0.5
SEED_TIMEOUT_S, SEED_RETRY_S = 2.0, 30.0  # reading today's earlier cost from the audit log
HISTORY_POINTS = 600  # ten minutes of snapshots, for the charts of a dashboard that just opened
TASK_MESSAGES_PER_S = 50  # per socket: a burst of tasks must not flood a dashboard
_SEEN_REMOTE = 2_000
_HISTORY_FIELDS = ("requests_per_s", "errors_per_s", "tokens_in_per_s", "tokens_out_per_s", "cost_per_min_usd")


class ActivitySubscription:
    """One socket's subscription: snapshots coalesce in one slot, task messages are dropped past the
    outbox's bound or the per-second budget. Nothing here ever waits on the socket."""

    def __init__(self, outbox: asyncio.Queue[bytes], allowed: Callable[[], bool]) -> None:
        self._outbox = outbox
        self.allowed = allowed  # the socket's key is still an admin key
        self._latest: bytes | None = None
        self._due = False  # SNAPSHOT_DUE is in the outbox
        self._second = 0
        self._tasks_this_second = 0
        self.dropped = 0  # messages not sent: the outbox was full or the budget spent

    def offer_snapshot(self, data: bytes) -> None:
        self._latest = data
        if self._due:
            return  # the marker queued earlier sends this newer one
        try:
            self._outbox.put_nowait(SNAPSHOT_DUE)
        except asyncio.QueueFull:
            self.dropped += 1
            return
        self._due = True

    def take_snapshot(self) -> bytes | None:
        """The newest snapshot, for the socket's writer when it reaches SNAPSHOT_DUE."""
        self._due = False
        data, self._latest = self._latest, None
        return data

    def offer_task(self, data: bytes) -> None:
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._tasks_this_second = second, 0
        if self._tasks_this_second >= TASK_MESSAGES_PER_S:
            self.dropped += 1
            return
        try:
            self._outbox.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped += 1
            return
        self._tasks_this_second += 1


class ActivityFeed:
    """Builds the merged snapshot once a second (whether anyone listens: the charts' history) and
    sends it, encoded once, to every subscription; task starts and ends go out as they happen."""

    def __init__(self, activity: Activity, redis: Redis | None, *, interval_s: float = 1.0) -> None:
        self.activity = activity
        self._redis = redis
        self._interval_s = interval_s
        self._subscribers: set[ActivitySubscription] = set()
        self._resources: Resources | None = None
        self._runner: asyncio.Task[None] | None = None
        self.latest: dict[str, Any] | None = None
        self._history: deque[tuple[float, ...]] = deque(maxlen=HISTORY_POINTS)
        self._cost_sent: dict[str, float] = {}  # of activity.cost_total, what Redis has been given
        self._day = ""
        self._day_baseline: dict[str, float] = {}  # activity.cost_total when the UTC day began here
        self._remote_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remote_primed = False  # the first snapshot's tasks are history, not news
        self._redis_down = False
        # Without Redis, today's spend before this process started comes from the audit log, once.
        self._started_at = datetime.now(UTC)
        self._seeded: dict[str, float] | None = None if redis is None else {}
        self._seed_after = 0.0  # monotonic time of the next try while the database does not answer
        activity.listeners.append(self._local_task)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def start(self, resources: Resources) -> None:
        self._resources = resources
        self._runner = asyncio.create_task(self._run(), name="activity-feed")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._redis is not None:
            # Gone at once from the others' instance count, rather than after STALE_S.
            with contextlib.suppress(*redis_errors(OSError, TimeoutError)):
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self._redis.hdel(INSTANCES_KEY, self.activity.instance_id)

    def subscribe(self, outbox: asyncio.Queue[bytes], allowed: Callable[[], bool]) -> ActivitySubscription:
        """A socket's subscription; it gets the newest snapshot at once, with the charts' history."""
        subscription = ActivitySubscription(outbox, allowed)
        self._subscribers.add(subscription)
        if self.latest is not None:
            subscription.offer_snapshot(orjson.dumps({**self.latest, "history": self._history_columns()}))
        return subscription

    def unsubscribe(self, subscription: ActivitySubscription) -> None:
        self._subscribers.discard(subscription)

    async def _run(self) -> None:
        failing = False
        while True:
            # Just after each whole second: the second the report ends with is complete.
            now = time.time()
            await asyncio.sleep(max(0.0, math.floor(now / self._interval_s + 1) * self._interval_s - now + 0.02))
            try:
                await self.tick()
                failing = False
            except Exception:
                if not failing:  # once per run of failures, not once a second
                    log.exception("activity feed: building the snapshot failed")
                failing = True

    async def tick(self) -> None:
        assert self._resources is not None, "start() first"
        await self._seed_cost_today()
        report = instance_report(self.activity, self._resources)
        reports, cost_today, shared = await self._exchange(report)
        snapshot = merge(reports, cost_today, shared=shared)
        snapshot["served_by"] = self.activity.instance_id
        self.latest = snapshot
        totals, requests = snapshot["totals"], snapshot["requests"]
        self._history.append(
            (
                snapshot["at"],
                requests["per_s"],
                requests["errors_per_s"],
                totals["tokens_in_per_s"],
                totals["tokens_out_per_s"],
                totals["cost_per_min_usd"],
            )
        )
        self._announce_remote_tasks(snapshot["recent_tasks"])
        if not self._subscribers:
            return
        data = orjson.dumps(snapshot)
        for subscription in list(self._subscribers):
            if subscription.allowed():
                subscription.offer_snapshot(data)
            else:
                self._subscribers.discard(subscription)

    def _history_columns(self) -> dict[str, list[float]]:
        columns: dict[str, list[float]] = {"t": [], **{name: [] for name in _HISTORY_FIELDS}}
        for point in self._history:
            for name, value in zip(columns, point, strict=True):
                columns[name].append(value)
        return columns

    # --- sharing through Redis --------------------------------------------------------------------

    def _local_cost_today(self) -> dict[str, float]:
        """This instance's cost since the UTC day began, with what the audit log had from before its start."""
        day = datetime.now(UTC).date().isoformat()
        totals = self.activity.cost_total
        if day != self._day:
            if self._day:  # a new day: nothing from before the start belongs to it
                self._seeded = {}
            self._day, self._day_baseline = day, dict(totals) if self._day else {}
        today = {model: total - self._day_baseline.get(model, 0.0) for model, total in totals.items()}
        for model, cost in (self._seeded or {}).items():
            today[model] = today.get(model, 0.0) + cost
        return today

    async def _seed_cost_today(self) -> None:
        """Read today's spend from before this process started (rows after it are counted here)."""
        if self._seeded is not None or time.monotonic() < self._seed_after or self._resources is None:
            return
        midnight = self._started_at.replace(hour=0, minute=0, second=0, microsecond=0)
        try:
            async with asyncio.timeout(SEED_TIMEOUT_S), self._resources.session_maker() as session:
                spent = await AuditRepository(session).cost_by_model(midnight, self._started_at)
        except Exception as exc:  # the database is down or slow: try again later, meanwhile count from here
            self._seed_after = time.monotonic() + SEED_RETRY_S
            log.info("activity feed: today's earlier cost not read yet (%s)", type(exc).__name__)
            return
        self._seeded = {model: float(cost) for model, cost in spent.items() if model is not None and cost}

    async def _exchange(self, report: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float], str]:
        """Publish this instance's report and read every instance's: (reports, cost today, how shared)."""
        local_cost = self._local_cost_today()
        if self._redis is None:
            return [report], local_cost, "none"
        cost_key = COST_KEY + self._day
        deltas = {
            model: total - self._cost_sent.get(model, 0.0)
            for model, total in self.activity.cost_total.items()
            if total > self._cost_sent.get(model, 0.0)
        }
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(INSTANCES_KEY, self.activity.instance_id, orjson.dumps(report))
                pipe.expire(INSTANCES_KEY, int(FORGET_S))
                for model, delta in deltas.items():
                    pipe.hincrbyfloat(cost_key, model, delta)
                pipe.expire(cost_key, 3 * 86_400)
                pipe.hgetall(INSTANCES_KEY)
                pipe.hgetall(cost_key)
                *_, instances, costs = await pipe.execute()
        except redis_errors(OSError, TimeoutError) as exc:
            if not self._redis_down:
                log.warning("activity feed: Redis unavailable (%s); snapshots show this instance only", exc)
                self._redis_down = True
            return [report], local_cost, "unavailable"
        if self._redis_down:
            log.info("activity feed: Redis answers again")
            self._redis_down = False
        for model, delta in deltas.items():
            self._cost_sent[model] = self._cost_sent.get(model, 0.0) + delta
        reports, forgotten = [report], []
        now = time.time()
        for raw_id, raw in instances.items():
            instance = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if instance == self.activity.instance_id:
                continue
            other = orjson.loads(raw)
            age = now - float(other.get("at", 0))
            if age > FORGET_S:
                forgotten.append(instance)
            elif age <= STALE_S:
                reports.append(other)
        if forgotten:
            with contextlib.suppress(*redis_errors(OSError, TimeoutError)):
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self._redis.hdel(INSTANCES_KEY, *forgotten)
        cost_today = {_text(model): float(value) for model, value in costs.items()}
        return reports, cost_today, "redis"

    # --- task messages ------------------------------------------------------------------------------

    def _local_task(self, summary: Callable[[], dict[str, Any]]) -> None:
        """A task of this instance started or ended: every subscription hears it now."""
        if not self._subscribers:
            return
        data = orjson.dumps({"type": "activity.task", **summary()})
        for subscription in self._subscribers:
            subscription.offer_task(data)

    def _announce_remote_tasks(self, tasks: list[dict[str, Any]]) -> None:
        """Other instances' tasks reach this one through their reports: each new state is told once."""
        first, self._remote_primed = not self._remote_primed, True
        for task in reversed(tasks):  # oldest first, as they happened
            if task.get("instance") == self.activity.instance_id:
                continue
            seen = (task["id"], task["status"])
            if seen in self._remote_seen:
                continue
            self._remote_seen[seen] = None
            if len(self._remote_seen) > _SEEN_REMOTE:
                self._remote_seen.popitem(last=False)
            if not first:  # before the first report, they are history: the snapshot has them
                data = orjson.dumps({"type": "activity.task", **task})
                for subscription in self._subscribers:
                    subscription.offer_task(data)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
