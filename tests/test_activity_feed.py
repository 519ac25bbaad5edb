"""The activity feed: its counters and merge in process, admin-only subscription, and two instances on one Redis."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from app.observability.activity import Activity, percentile
from app.observability.activity_feed import SNAPSHOT_DUE, TASK_MESSAGES_PER_S, ActivitySubscription
from app.observability.activity_merge import merge
from tests.support import PacemakerServer, RedisServer, pacemaker_env, run_cli, server_config, start_pacemaker


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(model: str | None = "m", *, status: str = "completed", http: int | None = 200, **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "status": status,
        "http_status": http,
        "error_code": fields.pop("error_code", None),
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": Decimal("0.001"),
        "latency_ms": 20.0,
        "ttft_ms": None,
        "transport": "json",
        **fields,
    }


def test_the_counters_cover_the_last_complete_seconds_only() -> None:
    clock = Clock()
    activity = Activity("a", clock)
    for _ in range(10):
        activity.observe(row())
    activity.observe(row(status="rejected", http=429, error_code="rate_limited"))
    clock.now += 1
    activity.observe(row())  # the current second: not reported until it is complete
    report = activity.report()
    assert report["requests"] == 11 and report["errors"] == 1
    assert report["statuses"] == {"200": 10, "429": 1}
    assert report["codes"] == {"rate_limited": 1}
    model = report["models"]["m"]
    assert model["tokens_in"] == 110 and model["tokens_out"] == 55
    assert model["cost_minute"] == pytest.approx(0.011)
    assert sum(count for _bucket, count in model["latency"]) == 10  # the refusal's latency is left out
    # Past the rate window, the rates drop to nothing; past the minute, the percentiles too.
    clock.now += 6
    assert activity.report()["requests"] == 0
    clock.now += 60
    assert activity.report()["models"] == {}
    assert activity.cost_total == {"m": pytest.approx(0.012)}  # the running total stays, for cost today


def test_percentiles_from_the_buckets_are_within_five_percent() -> None:
    clock = Clock()
    activity = Activity("a", clock)
    for latency in range(1, 1001):  # 1..1000 ms, one each
        activity.observe(row(latency_ms=float(latency)))
    clock.now += 1
    histogram = dict(activity.report()["models"]["m"]["latency"])
    assert percentile(histogram, 50) == pytest.approx(500, rel=0.05)
    assert percentile(histogram, 95) == pytest.approx(950, rel=0.05)
    assert percentile({}, 50) is None


def test_reports_merge_histograms_before_their_percentiles_and_breakers_at_their_worst() -> None:
    clock = Clock()
    fast, slow = Activity("a", clock), Activity("b", clock)
    for _ in range(50):
        fast.observe(row(latency_ms=10.0))
        slow.observe(row(latency_ms=1000.0))
    slow.observe(row(latency_ms=1000.0))  # the median is now one of the slow ones
    clock.now += 1
    reports = []
    for activity, state in ((fast, "closed"), (slow, "open")):
        report = activity.report()
        report.update(instance=activity.instance_id, at=clock.now, limiter={"backend": "redis", "degraded": False})
        report["gauges"] = {"websockets": 2, "sandbox": None, "audit": {"queue_depth": 3, "database_ok": True}}
        report["breakers"] = [{"name": "up/x", "kind": "upstream", "state": state, "open_remaining_s": 0.0}]
        reports.append(report)
    reports[1]["breakers"][0]["open_remaining_s"] = 12.0
    reports[1]["gauges"]["audit"]["database_ok"] = False
    snapshot = merge(reports, {"m": 0.5}, shared="redis")
    assert snapshot["instances"] == 2 and snapshot["instance_ids"] == ["a", "b"]
    assert snapshot["requests"]["per_s"] == pytest.approx(101 / 5)
    latency = snapshot["models"]["m"]["latency_ms"]
    assert latency["count"] == 101 and latency["p50"] == pytest.approx(1000, rel=0.05)
    assert snapshot["models"]["m"]["cost_today_usd"] == 0.5
    assert snapshot["active"]["websockets"] == 4
    assert snapshot["active"]["audit"] == {"queue_depth": 6, "database_ok": False}
    [breaker] = snapshot["breakers"]
    assert breaker["state"] == "open" and breaker["open_instances"] == 1 and breaker["instances"] == 2
    assert breaker["open_remaining_s"] == 12.0


def test_a_slow_socket_gets_the_newest_snapshot_not_a_queue_and_never_blocks_the_feed() -> None:
    outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    subscription = ActivitySubscription(outbox, lambda: True)
    for n in range(100):  # the client reads nothing meanwhile
        subscription.offer_snapshot(f"snapshot {n}".encode())
    assert outbox.qsize() == 1 and outbox.get_nowait() is SNAPSHOT_DUE
    assert subscription.take_snapshot() == b"snapshot 99"
    assert subscription.take_snapshot() is None  # taken: nothing older is left to send
    # Task messages fill the outbox up to its bound, then are dropped, never waited for.
    for n in range(10):
        subscription.offer_task(f"task {n}".encode())
    assert outbox.qsize() == 4 and subscription.dropped == 6
    subscription.offer_snapshot(b"newest")  # no room for the marker: dropped, and offered again next second
    assert subscription.dropped == 7


def test_task_messages_are_capped_per_second_per_socket() -> None:
    outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
    subscription = ActivitySubscription(outbox, lambda: True)
    for _ in range(TASK_MESSAGES_PER_S * 3):
        subscription.offer_task(b"task")
    assert outbox.qsize() <= TASK_MESSAGES_PER_S * 2  # at most two seconds' budgets if a second turned over
    assert subscription.dropped >= TASK_MESSAGES_PER_S


# --- against real servers -------------------------------------------------------------------------


def ws_url(server: PacemakerServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/ws"


async def subscribe(server: PacemakerServer, key: str) -> ClientConnection:
    socket = await websockets.connect(ws_url(server), additional_headers={"Authorization": f"Bearer {key}"})
    await socket.send(json.dumps({"type": "subscribe", "topic": "activity"}))
    return socket


async def next_message(socket: ClientConnection, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), deadline - time.monotonic()))
        if message["type"] == kind:
            return message


async def test_a_key_that_is_not_an_admin_key_is_forbidden(server: PacemakerServer) -> None:
    async with await subscribe(server, server.key) as socket:
        refused = await next_message(socket, "error")
        assert refused["code"] == "forbidden"
        # The socket stays open for what the key may do.
        await socket.send(json.dumps({"type": "task.create", "query": "still here"}))
        assert (await next_message(socket, "task.completed"))["type"] == "task.completed"


def admin_key(server: PacemakerServer) -> str:
    created = server.cli("keys", "create", "--name", "admin", "--admin", "--json")
    key: str = json.loads(created.stdout)["key"]
    return key


@dataclass
class Pair:
    a: PacemakerServer
    b: PacemakerServer


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("activity-pair")
    redis = RedisServer(root)
    redis.start()
    models = {
        name: {"provider": "simulated", "input_usd_per_mtok": "3", "output_usd_per_mtok": "15"}
        for name in ("sim-small", "sim-medium", "sim-large")
    }
    servers = []
    try:
        for name in ("a", "b"):
            workdir = root / name
            servers.append(
                start_pacemaker(workdir, server_config(workdir, None, limits={"redis_url": redis.url}, models=models))
            )
        yield Pair(*servers)
    finally:
        for server in servers:
            server.process.stop()
        redis.kill()


async def test_an_admin_hears_of_each_task_at_its_start_and_end(pair: Pair) -> None:
    server = pair.a
    async with await subscribe(server, admin_key(server)) as socket:
        await next_message(socket, "activity.snapshot")
        async with server.client() as http:
            result = (await http.post("/v1/tasks", json={"query": "What is 6 * 7?"})).json()
        started = await next_message(socket, "activity.task")
        ended = await next_message(socket, "activity.task")
    assert started["id"] == ended["id"] == result["id"]
    assert started["status"] == "running" and started["duration_ms"] is None
    assert started["key_prefix"] == server.key[: len(started["key_prefix"])]
    assert ended["status"] == "completed" and ended["duration_ms"] > 0
    usage = result["usage"]
    assert (ended["prompt_tokens"], ended["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])


async def test_a_task_on_the_other_instance_is_told_within_a_few_seconds(pair: Pair) -> None:
    """Before any other test runs a task on B: its first task is news to A, not history."""
    async with await subscribe(pair.a, admin_key(pair.a)) as socket:
        for _ in range(2):  # past the first snapshot, whose tasks are history
            served_by = (await next_message(socket, "activity.snapshot"))["served_by"]
        async with pair.b.client() as http:
            task = (await http.post("/v1/tasks", json={"query": "on the other one"})).json()
        deadline = time.monotonic() + 5
        told = None
        while told is None and time.monotonic() < deadline:
            message = await next_message(socket, "activity.task")
            told = message if message["id"] == task["id"] else None
    assert told is not None, "B's task never reached A's feed"
    assert told["status"] == "completed" and told["instance"] != served_by


async def test_two_instances_on_one_redis_make_one_snapshot_that_counts_both(pair: Pair) -> None:
    key = admin_key(pair.a)
    costs = []
    async with await subscribe(pair.a, key) as socket:
        # A window clear of earlier tests' requests first, so that the count below is exact.
        while (clear := await next_message(socket, "activity.snapshot", timeout=10))["requests"]["per_s"]:
            pass
        before = clear["totals"]["cost_today_usd"]  # the day's spend so far (earlier tests')
        for server, count in ((pair.a, 4), (pair.b, 7)):
            async with server.client() as http:
                for n in range(count):
                    answer = await http.post("/v1/tasks", json={"query": f"count me {n}"})
                    assert answer.status_code == 200
                    costs.append(float(answer.json()["cost_usd"]))
        # Every request falls in the 5-second window of one snapshot within a few seconds.
        deadline = time.monotonic() + 10
        merged = None
        while time.monotonic() < deadline:
            snapshot = await next_message(socket, "activity.snapshot")
            if snapshot["instances"] == 2 and round(snapshot["requests"]["per_s"] * snapshot["window_s"]) == 11:
                merged = snapshot
                break
        assert merged is not None, snapshot
        # Cost today adds up both instances' spend, through the shared hash.
        while merged["totals"]["cost_today_usd"] < before + sum(costs) * 0.999 and time.monotonic() < deadline:
            merged = await next_message(socket, "activity.snapshot")
    assert merged["shared"] == "redis" and len(merged["instance_ids"]) == 2
    assert merged["models"]["sim-small"]["requests_per_s"] == pytest.approx(11 / 5)
    assert merged["totals"]["cost_today_usd"] == pytest.approx(before + sum(costs), rel=1e-6)
    # B's tasks are among the recent ones A shows, each with its instance.
    assert {task["instance"] for task in merged["recent_tasks"]} == set(merged["instance_ids"])


async def test_cost_today_counts_what_was_spent_before_a_restart_without_redis(tmp_path: Path) -> None:
    models = {"sim-small": {"provider": "simulated", "input_usd_per_mtok": "3", "output_usd_per_mtok": "15"}}
    config = server_config(tmp_path, None, models=models)
    first = start_pacemaker(tmp_path, config)
    try:
        async with first.client() as http:
            spent = float((await http.post("/v1/tasks", json={"query": "before the restart"})).json()["cost_usd"])
    finally:
        first.process.stop()  # its audit row is written on the way out
    assert spent > 0
    again = start_pacemaker(tmp_path, config)  # the same database
    try:
        async with await subscribe(again, admin_key(again)) as socket:
            snapshot = await next_message(socket, "activity.snapshot")
            if snapshot["totals"]["cost_today_usd"] == 0:  # the first tick may have come before the read
                snapshot = await next_message(socket, "activity.snapshot")
    finally:
        again.process.stop()
    assert snapshot["shared"] == "none"
    assert snapshot["totals"]["cost_today_usd"] == pytest.approx(spent, rel=1e-6)
    assert snapshot["models"]["sim-small"]["cost_today_usd"] == pytest.approx(spent, rel=1e-6)


def test_make_runs_development_key_is_an_admin_key_and_the_dashboard_is_printed(tmp_path: Path) -> None:
    env = pacemaker_env(tmp_path, server_config(tmp_path, None))
    run_cli(env, "migrate")
    printed = run_cli(env, "dev-key").stdout
    assert "/dashboard" in printed
    database = tmp_path / "pacemaker.db"
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT is_admin FROM api_key WHERE name = 'development'").fetchall() == [(1,)]
        connection.execute("UPDATE api_key SET is_admin = 0")  # one made before the dashboard
    run_cli(env, "dev-key")
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT is_admin FROM api_key WHERE name = 'development'").fetchall() == [(1,)]
