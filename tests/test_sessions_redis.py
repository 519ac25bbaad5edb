"""Conversations on Redis (a redis-server of the test's own): two instances serve one conversation, restarts
keep it, holds span instances, TTLs are real, the Lua append bounds a session, and an outage is a 503."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.enforcement.redis_limiter import build_redis
from app.sessions.base import SessionBusy, encode_turn, turn_tokens
from app.sessions.metrics import SessionMetrics
from app.sessions.redis_store import RedisSessionStore
from app.sessions.settings import SessionsSettings
from tests.support import PacemakerServer, RedisServer, fresh_postgres_database, server_config, start_pacemaker

LEASE_S = 3.0
SYSTEM = {"role": "system", "content": "You are Pacemaker, a helpful agent. Use the tools offered when they help."}


@dataclass
class Cluster:
    redis: RedisServer
    config: dict[str, Any]
    root: Path
    a: PacemakerServer | None = None
    b: PacemakerServer | None = None
    key: str = ""  # keys live in the shared database: any instance, and any restart of one, takes it

    def start(self, name: str, **overrides: Any) -> PacemakerServer:
        workdir = self.root / f"{name}-{uuid.uuid4().hex[:6]}"
        own = {
            "audit": {"spool_dir": str(workdir / "audit-spool")},
            # Short leases: an instance killed mid-turn is found out within seconds.
            "tasks": {"spool_dir": str(workdir / "task-spool"), "lease_s": LEASE_S, "lease_renew_s": 0.5},
            "auth": {"dev_key_file": str(workdir / "dev-key")},
        }
        return start_pacemaker(workdir, {**self.config, **own, **overrides})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("sessions-redis")
    redis = RedisServer(root)
    redis.start()
    with fresh_postgres_database("pacemaker_sessions") as url:
        # Only the sessions on Redis: limits and events stay in process, so an outage is the sessions' alone.
        config = server_config(
            root, fake_upstream, database={"url": url}, sessions={"redis_url": redis.url, "max_session_bytes": 6000}
        )
        cluster = Cluster(redis, config, root)
        cluster.a, cluster.b = cluster.start("a"), cluster.start("b")
        cluster.key = cluster.a.key
        try:
            yield cluster
        finally:
            for server in (cluster.a, cluster.b):
                server.process.stop()
            redis.kill()


@pytest.fixture
async def store(cluster: Cluster) -> AsyncIterator[RedisSessionStore]:
    settings = SessionsSettings(
        redis_url=cluster.redis.url, redis_prefix=f"test:{uuid.uuid4().hex[:8]}", ttl_s=1.0, max_session_bytes=1000
    )
    made = RedisSessionStore(build_redis(cluster.redis.url), settings, SessionMetrics.register(CollectorRegistry()))
    yield made
    await made.aclose()


def fresh(prefix: str = "chat") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def ask(server: PacemakerServer, key: str, query: str, session: str) -> httpx.Response:
    async with server.client(key) as http:
        return await http.post("/v1/tasks", json={"query": query, "model": "fake-model", "session_id": session})


async def sent_for(upstream_stats: httpx.AsyncClient, tag: str) -> list[dict[str, Any]]:
    found = []
    for body in (await upstream_stats.get("/_control/stats")).json()["last_bodies"]:
        users = [m for m in body["messages"] if m["role"] == "user"]
        if users and f"#tag={tag}" in users[-1]["content"]:
            found.append(body)
    return found


async def test_turn_one_on_a_turn_two_on_b_and_restarts_of_both_keep_the_session(
    cluster: Cluster, upstream_stats: httpx.AsyncClient
) -> None:
    assert cluster.a is not None and cluster.b is not None
    session, tags = fresh(), [fresh("t") for _ in range(3)]
    one = (await ask(cluster.a, cluster.key, f"What is 6 * 7? #tag={tags[0]}", session)).json()
    two = (await ask(cluster.b, cluster.key, f"And doubled? #tag={tags[1]}", session)).json()
    assert one["session"]["stored"] and two["session"]["history_turns"] == 1, (one, two)
    _call, answered = await sent_for(upstream_stats, tags[0])
    [sent] = await sent_for(upstream_stats, tags[1])
    assert sent["messages"] == [
        *answered["messages"],  # system, the query, the tool call and its result, as A's model saw them
        {"role": "assistant", "content": one["output"]},
        {"role": "user", "content": f"And doubled? #tag={tags[1]}"},
    ]
    async with cluster.a.client(cluster.key) as on_a, cluster.b.client(cluster.key) as on_b:
        seen_a, seen_b = (
            (await on_a.get(f"/v1/sessions/{session}")).json(),
            (await on_b.get(f"/v1/sessions/{session}")).json(),
        )
    assert seen_a == seen_b and seen_a["turns"] == 2
    for server in (cluster.a, cluster.b):
        server.process.stop()
    cluster.a, cluster.b = cluster.start("a"), cluster.start("b")
    three = (await ask(cluster.b, cluster.key, f"And once more? #tag={tags[2]}", session)).json()
    assert three["session"]["history_turns"] == 2
    [again] = await sent_for(upstream_stats, tags[2])
    assert again["messages"][: len(sent["messages"])] == sent["messages"]


async def test_a_turn_running_on_one_instance_makes_the_other_answer_409(cluster: Cluster) -> None:
    assert cluster.a is not None and cluster.b is not None
    session = fresh()
    running = asyncio.create_task(ask(cluster.a, cluster.key, "slowly #latency=1.5", session))
    await asyncio.sleep(0.5)
    refused = await ask(cluster.b, cluster.key, "meanwhile", session)
    done = await running
    assert refused.status_code == 409 and refused.json()["code"] == "session_busy", refused.text
    assert refused.headers["retry-after"] == "1" and refused.json()["task_id"] == done.json()["id"]
    after = await ask(cluster.b, cluster.key, "now", session)
    assert after.json()["session"]["history_turns"] == 1


async def test_a_turn_whose_instance_is_killed_frees_its_session_when_its_lease_lapses(cluster: Cluster) -> None:
    assert cluster.b is not None
    victim = cluster.start("victim")
    session = fresh()
    async with victim.client(cluster.key) as http:
        body = {"query": "forever #latency=60", "model": "fake-model", "session_id": session, "background": True}
        accepted = (await http.post("/v1/tasks", json=body)).json()
    await asyncio.sleep(0.3)
    victim.process.stop(signal.SIGKILL)
    assert (await ask(cluster.b, cluster.key, "too soon", session)).status_code == 409
    async with cluster.b.client(cluster.key) as http:
        for _ in range(100):
            record = (await http.get(f"/v1/tasks/{accepted['id']}")).json()
            if record["status"] != "running":
                break
            await asyncio.sleep(0.2)
    assert record["error"]["code"] == "worker_lost", record
    # Its hold would have lasted the task's timeout (300 s); the sweep that ended the task freed it.
    after = await ask(cluster.b, cluster.key, "now then", session)
    assert after.status_code == 200 and after.json()["session"]["history_turns"] == 0


async def test_a_session_unused_past_its_ttl_is_gone(cluster: Cluster) -> None:
    short = cluster.start("short-ttl", sessions={"redis_url": cluster.redis.url, "ttl_s": 1.0})
    try:
        session = fresh()
        assert (await ask(short, short.key, "remember me", session)).json()["session"]["stored"]
        async with short.client() as http:
            assert (await http.get(f"/v1/sessions/{session}")).status_code == 200
            await asyncio.sleep(1.3)
            assert (await http.get(f"/v1/sessions/{session}")).status_code == 404
            assert session not in [s["id"] for s in (await http.get("/v1/sessions")).json()["data"]]
        after = (await ask(short, short.key, "do you remember?", session)).json()
        assert after["session"]["history_turns"] == 0
    finally:
        short.process.stop()


async def test_with_redis_down_a_session_task_is_503_and_others_run_and_a_turn_is_not_stored_midway(
    cluster: Cluster,
) -> None:
    assert cluster.a is not None
    session = fresh()
    assert (await ask(cluster.a, cluster.key, "before", session)).status_code == 200
    # Redis goes away while a turn runs: the task completes, and says its turn was not stored.
    running = asyncio.create_task(ask(cluster.a, cluster.key, "during #latency=1", session))
    await asyncio.sleep(0.4)
    cluster.redis.kill()
    try:
        midway = (await running).json()
        assert midway["output"] and midway["session"]["stored"] is False
        assert midway["session"]["reason"] == "store_unavailable"
        refused = await ask(cluster.a, cluster.key, "down", session)
        problem = refused.json()
        assert refused.status_code == 503 and problem["code"] == "session_unavailable" and problem["retryable"]
        assert refused.headers["retry-after"] == "1"
        async with cluster.a.client(cluster.key) as http:
            assert (await http.post("/v1/tasks", json={"query": "no session"})).status_code == 200
            listed = await http.get("/v1/sessions")
            assert listed.status_code == 503 and listed.json()["code"] == "session_unavailable"
            # Serving goes on without sessions: readiness says degraded, not unavailable.
            ready = await http.get("/health/ready")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert ready.json()["checks"]["sessions"].startswith("error: ")
    finally:
        cluster.redis.start()
    recovered = await ask(cluster.a, cluster.key, "back", fresh())  # without a restart of Pacemaker
    assert recovered.status_code == 200 and recovered.json()["session"]["stored"]
    async with cluster.a.client(cluster.key) as http:
        assert (await http.get("/health/ready")).json()["checks"]["sessions"] == "ok"


def turn(text: str, size: int = 0) -> bytes:
    return encode_turn([{"role": "user", "content": text + "x" * size}, {"role": "assistant", "content": "ok"}])


async def test_the_lua_append_keeps_whole_turns_within_the_bound_and_a_retry_appends_once(
    store: RedisSessionStore,
) -> None:
    key = (1, "s")
    turns = [turn(str(n), 300) for n in range(5)]
    fit = 1000 // len(turns[0])
    for n, data in enumerate(turns):
        history = await store.begin(key, f"t{n}", 10)
        assert history == turns[max(0, n - fit) : n]
        assert (await store.finish(key, f"t{n}", data)).stored
    again = await store.finish(key, "t4", turns[4])  # a call retried after its answer was lost
    found = await store.read(key)
    assert found is not None
    info, kept = found
    assert again.stored and kept == turns[-fit:] and fit < len(turns)
    assert info.turns == len(kept) and info.bytes == sum(map(len, kept)) and info.tokens == sum(map(turn_tokens, kept))
    too_big = await store.finish(key, "big", turn("", 2000))
    assert (too_big.stored, too_big.reason) == (False, "turn_too_large") and await store.read(key) == found


async def test_an_append_whose_answer_times_out_is_tried_again_and_stored_once(
    store: RedisSessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, real = (4, "s"), store._finish
    calls = 0

    async def late_answer(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        reply = await real(**kwargs)  # Redis ran the script; only its answer is lost
        if calls == 1:
            raise RedisTimeoutError("Timeout reading from socket")
        return reply

    monkeypatch.setattr(store, "_finish", late_answer)
    await store.begin(key, "t", 10)
    appended = await store.finish(key, "t", turn("once"))
    found = await store.read(key)
    assert calls == 2 and appended.stored and found is not None and found[1] == [turn("once")]
    assert await store.begin(key, "next", 10) == [turn("once")]  # the first call released the hold


async def test_holds_are_per_task_and_lapse_with_the_tasks_timeout(store: RedisSessionStore) -> None:
    key = (2, "s")
    await store.begin(key, "first", 0.3)
    with pytest.raises(SessionBusy) as busy:
        await store.begin(key, "second", 10)
    assert busy.value.extra == {"task_id": "first"}
    with pytest.raises(SessionBusy):
        await store.delete(key)
    await store.release(key, "second")  # not the holder
    await asyncio.sleep(0.4)
    await store.begin(key, "second", 10)
    late = await store.finish(key, "first", turn("late"))
    assert (late.stored, late.reason) == (False, "hold_expired")
    assert (await store.finish(key, "second", turn("mine"))).stored
    assert await store.delete(key) and not await store.delete(key)


async def test_a_redis_session_expires_and_leaves_the_listing(store: RedisSessionStore) -> None:
    for name in ("b", "a", "c"):
        await store.begin((3, name), "t", 10)
        await store.finish((3, name), "t", turn(name))
    first = await store.page(3, None, 2)
    second = await store.page(3, first.next_after, 2)
    assert [s.id for s in first.sessions + second.sessions] == ["a", "b", "c"] and second.next_after is None
    await asyncio.sleep(0.6)
    await store.begin((3, "b"), "t2", 10)  # a use: its TTL starts again
    await store.release((3, "b"), "t2")
    await asyncio.sleep(0.6)
    assert [s.id for s in (await store.page(3, None, 10)).sessions] == ["b"]
    assert await store.read((3, "a")) is None and await store.read((3, "b")) is not None
