"""This instance's live activity: per-second counters of requests, tokens, cost and latency, and its recent tasks."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import add
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.tasks.models import TaskRecord

MINUTE_S = 60  # the window of percentiles and of cost per minute
SLOTS = MINUTE_S + 1  # the seconds kept: the last minute and the current second
RATE_WINDOW_S = 5  # rates (requests/s, tokens/s) are averaged over the last complete seconds
RECENT_TASKS = 30

# Latency buckets grow by 10 % from 0.1 ms (bucket 0) to about 4 minutes: a percentile is within
# 5 % of the truth, and a window holds at most a few hundred buckets per model.
_BASE_MS = 0.1
_GROWTH = 1.1
_PER_LN = 1 / math.log(_GROWTH)
_PER_BASE = 1 / _BASE_MS
_log = math.log
_MAX_BUCKET = 160

Histogram = dict[int, int]  # bucket -> count


def percentile(histogram: Histogram, q: float) -> float | None:
    """The q-th percentile (0-100) of a bucket histogram, as its bucket's geometric middle, in ms."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round(float(_BASE_MS * _GROWTH ** (bucket + 0.5)), 3)
    raise AssertionError("unreachable: rank <= total")


def add_histogram(into: Histogram, other: Histogram) -> None:
    for bucket, count in other.items():
        into[bucket] = into.get(bucket, 0) + count


@dataclass(slots=True)
class _ModelSecond:
    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    # Counts by bucket, a list rather than a dict: one index per request.
    latency: list[int] = field(default_factory=lambda: [0] * (_MAX_BUCKET + 1))
    ttft: list[int] = field(default_factory=lambda: [0] * (_MAX_BUCKET + 1))


@dataclass(slots=True)
class _Second:
    at: int = -1  # the epoch second this slot counts (another one: the slot is stale)
    requests: int = 0
    errors: int = 0
    statuses: dict[int | str, int] = field(default_factory=dict)  # HTTP status (or "ws") -> requests
    codes: dict[str, int] = field(default_factory=dict)  # error code -> requests
    models: dict[str, _ModelSecond] = field(default_factory=dict)

    def reset(self, at: int) -> None:
        self.at, self.requests, self.errors = at, 0, 0
        self.statuses, self.codes, self.models = {}, {}, {}


# Hears a task start or end; given the summary's maker, called only by a listener that needs it
# (the feed listens always, but sends only while a dashboard subscribes).
TaskListener = Callable[[Callable[[], dict[str, Any]]], None]
_ERRORS = frozenset({"failed", "rejected", "timeout"})


class Activity:
    """Counts what the request path already produces: one audit row per request, a task's start and end.

    `observe(row)` is the only per-request cost (a few dict updates in the slot of the current
    second, no lock: it runs on the event loop). The report is built once a second by the feed.
    """

    def __init__(self, instance_id: str, clock: Callable[[], float] = time.time) -> None:
        self.instance_id = instance_id
        self._clock = clock
        self._slots = [_Second() for _ in range(SLOTS)]
        self.cost_total: dict[str, float] = {}  # per model since start, to the last complete second reported
        self._costed_until = 0  # the seconds before this one are in cost_total
        self._tasks: OrderedDict[str, _RecentTask] = OrderedDict()  # newest last
        self._prefixes: dict[str, str] = {}  # key prefix of the tasks running here
        self.listeners: list[TaskListener] = []

    # --- the request path ------------------------------------------------------------------

    def observe(self, row: dict[str, Any]) -> None:
        """One request (an audit row, whatever its transport), as it ends."""
        second = int(self._clock())
        slot = self._slots[second % SLOTS]
        if slot.at != second:
            slot.reset(second)
        slot.requests += 1
        http_status = row["http_status"]
        status_key = http_status if http_status is not None else row["transport"]  # a WebSocket task has none
        statuses = slot.statuses
        statuses[status_key] = statuses.get(status_key, 0) + 1
        outcome = row["status"]
        failed = outcome in _ERRORS
        if failed:
            slot.errors += 1
            code = row["error_code"] or f"http_{http_status}"
            slot.codes[code] = slot.codes.get(code, 0) + 1
        model = row["model"]
        if model is None:
            return
        per_model = slot.models.get(model)
        if per_model is None:
            per_model = slot.models[model] = _ModelSecond()
        per_model.requests += 1
        per_model.errors += failed
        per_model.tokens_in += row["prompt_tokens"]
        per_model.tokens_out += row["completion_tokens"]
        cost = row["cost_usd"]
        if cost:
            per_model.cost += float(cost)
        if outcome == "completed":  # a refusal's few microseconds would pull the percentiles down
            # The bucket, inlined (no call): this runs once per request.
            latency = row["latency_ms"]
            if latency is not None:
                per_model.latency[
                    min(_MAX_BUCKET, int(_log(latency * _PER_BASE) * _PER_LN)) if latency > _BASE_MS else 0
                ] += 1
            ttft = row["ttft_ms"]
            if ttft is not None:
                per_model.ttft[min(_MAX_BUCKET, int(_log(ttft * _PER_BASE) * _PER_LN)) if ttft > _BASE_MS else 0] += 1

    def task_started(self, record: TaskRecord, key_prefix: str, transport: str) -> None:
        self._prefixes[record.id] = key_prefix
        self._task(record, key_prefix, transport)

    def task_ended(self, record: TaskRecord, transport: str) -> None:
        self._task(record, self._prefixes.pop(record.id, None), transport)

    def _task(self, record: TaskRecord, key_prefix: str | None, transport: str) -> None:
        recent = _RecentTask(record, key_prefix, transport, self.instance_id)
        self._tasks[record.id] = recent
        self._tasks.move_to_end(record.id)
        while len(self._tasks) > RECENT_TASKS:
            self._tasks.popitem(last=False)
        for listener in self.listeners:
            listener(recent.summary)

    # --- once a second -------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """This instance's counters over the last complete seconds (not the current, still counting)."""
        now = int(self._clock())
        # The running cost total, kept here once a second rather than on each request.
        for slot in self._slots:
            if self._costed_until <= slot.at < now:
                for name, per_model in slot.models.items():
                    self.cost_total[name] = self.cost_total.get(name, 0.0) + per_model.cost
        self._costed_until = now
        rates = self._seconds(now, RATE_WINDOW_S)
        minute = self._seconds(now, MINUTE_S)
        statuses: dict[str, int] = {}
        codes: dict[str, int] = {}
        models: dict[str, dict[str, Any]] = {}
        for slot in rates:
            _add_counts(statuses, {str(status): count for status, count in slot.statuses.items()})
            _add_counts(codes, slot.codes)
            for name, per_model in slot.models.items():
                entry = models.setdefault(name, _model_entry())
                entry["requests"] += per_model.requests
                entry["errors"] += per_model.errors
                entry["tokens_in"] += per_model.tokens_in
                entry["tokens_out"] += per_model.tokens_out
        for slot in minute:
            for name, per_model in slot.models.items():
                entry = models.setdefault(name, _model_entry())
                entry["cost_minute"] += per_model.cost
                # Added element by element in C (map): a tick adds up a minute of 161-bucket lists.
                entry["latency"] = list(map(add, entry["latency"], per_model.latency))
                entry["ttft"] = list(map(add, entry["ttft"], per_model.ttft))
        for entry in models.values():
            # Sorted pairs: JSON keys would be strings, and merging adds them up by bucket.
            entry["latency"] = [(bucket, count) for bucket, count in enumerate(entry["latency"]) if count]
            entry["ttft"] = [(bucket, count) for bucket, count in enumerate(entry["ttft"]) if count]
        return {
            "requests": sum(slot.requests for slot in rates),
            "errors": sum(slot.errors for slot in rates),
            "statuses": statuses,
            "codes": codes,
            "models": models,
            "recent_tasks": [recent.summary() for recent in reversed(self._tasks.values())],
        }

    def _seconds(self, now: int, count: int) -> Iterable[_Second]:
        oldest = now - count
        return [slot for slot in self._slots if oldest <= slot.at < now]


class _RecentTask:
    """A task as the dashboard lists it, summarised when first read: most records are replaced by the
    task's next one (or pushed out) before anyone reads them, and a summary cost more than the rest of
    this bookkeeping (the record is immutable, so a later summary says the same)."""

    __slots__ = ("_summary", "instance_id", "key_prefix", "record", "transport")

    def __init__(self, record: TaskRecord, key_prefix: str | None, transport: str, instance_id: str) -> None:
        self.record, self.key_prefix, self.transport, self.instance_id = record, key_prefix, transport, instance_id
        self._summary: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        if self._summary is None:
            self._summary = task_summary(self.record, self.key_prefix, self.transport, self.instance_id)
        return self._summary


def task_summary(record: TaskRecord, key_prefix: str | None, transport: str, instance_id: str) -> dict[str, Any]:
    started, finished = record.started_at, record.finished_at
    duration = (finished - started).total_seconds() * 1000 if started and finished else None
    return {
        "id": record.id,
        "key_prefix": key_prefix,
        "model": record.model,
        "status": record.status,
        "error_code": record.error_code,
        "background": record.background,
        "transport": "background" if record.background else transport,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": float(record.cost_usd),
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat() if finished else None,
        "duration_ms": round(duration, 1) if duration is not None else None,
        "instance": instance_id,
    }


def _model_entry() -> dict[str, Any]:
    return {
        "requests": 0,
        "errors": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "cost_minute": 0.0,
        "latency": [0] * (_MAX_BUCKET + 1),
        "ttft": [0] * (_MAX_BUCKET + 1),
    }


def _add_counts(into: dict[str, int], other: dict[str, int]) -> None:
    for name, count in other.items():
        into[name] = into.get(name, 0) + count
