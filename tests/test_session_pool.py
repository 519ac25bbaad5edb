"""The in-process session pool: TTL on a fake clock, the sweeper, LRU eviction at 95 % down to 80 %, the
per-session bound, holds, its metrics, and its memory with 100,000 small sessions (psutil, in a process of its own)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from app.sessions.base import SessionBusy, encode_turn, turn_messages, turn_tokens
from app.sessions.memory import MemorySessionStore
from app.sessions.metrics import SessionMetrics
from app.sessions.settings import SessionsSettings
from tests.support import ROOT


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def pool(clock: FakeClock | None = None, **settings: object) -> tuple[MemorySessionStore, CollectorRegistry]:
    registry = CollectorRegistry()
    store = MemorySessionStore(
        SessionsSettings.model_validate(settings), SessionMetrics.register(registry), clock=clock or FakeClock()
    )
    return store, registry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def turn(text: str, size: int = 0) -> bytes:
    return encode_turn([{"role": "user", "content": text + "x" * size}, {"role": "assistant", "content": "ok"}])


async def add(store: MemorySessionStore, key: tuple[int, str], data: bytes, task: str = "t") -> None:
    await store.begin(key, task, 60)
    appended = await store.finish(key, task, data)
    assert appended.stored, appended


def test_a_turn_is_stored_with_its_tokens_first() -> None:
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"result": 4}'},
        {"role": "assistant", "content": "4"},
    ]
    data = encode_turn(messages)
    assert turn_messages(data) == messages
    assert turn_tokens(data) > 0 and data.startswith(b"%d\n" % turn_tokens(data))


async def test_a_session_unused_past_ttl_is_gone_and_the_sweeper_removes_it_too() -> None:
    clock = FakeClock()
    store, registry = pool(clock, ttl_s=60)
    await add(store, (1, "kept"), turn("a"))
    await add(store, (1, "read"), turn("b"))
    await add(store, (1, "idle"), turn("c"))
    clock.now += 59
    assert await store.begin((1, "kept"), "t2", 60) != []  # a use: its TTL starts again
    await store.release((1, "kept"), "t2")
    assert await store.read((1, "read")) is not None  # reading is not a use
    clock.now += 2
    assert await store.read((1, "read")) is None  # expired on access
    assert store.sweep() == 1  # "idle", from the front of the LRU order
    assert [info.id for info in (await store.page(1, None, 10)).sessions] == ["kept"]
    assert metric(registry, "pacemaker_session_evictions_total", reason="ttl") == 2
    assert metric(registry, "pacemaker_sessions") == 1
    clock.now += 60
    assert await store.begin((1, "kept"), "t3", 60) == []
    assert metric(registry, "pacemaker_session_lookups_total", result="miss") == 4
    assert metric(registry, "pacemaker_session_lookups_total", result="hit") == 1


async def test_the_sweeper_runs_on_its_interval() -> None:
    clock = FakeClock()
    store, _ = pool(clock, ttl_s=1, sweep_interval_s=0.05)
    await add(store, (1, "s"), turn("a"))
    clock.now += 5
    await store.start()
    try:
        for _ in range(100):
            if len(store) == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        await store.aclose()
    assert len(store) == 0


async def test_past_95_percent_the_least_recently_used_go_down_to_80_percent(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store, registry = pool(clock, max_bytes=100_000, max_session_bytes=10_000)
    data = turn("", 900)
    size = len(data)
    count = 0
    caplog.set_level(logging.WARNING, "app.sessions.memory")
    while store.total_bytes + size < 0.95 * 100_000:
        clock.now += 1
        await add(store, (7, f"s{count:03d}"), data)
        count += 1
    assert store.total_bytes >= 0.80 * 100_000
    warnings = [r for r in caplog.records if "it evicts" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # once, not on every turn past 80 %
    await store.begin((7, "s000"), "t", 60)  # the oldest becomes the most recently used
    await store.release((7, "s000"), "t")
    assert metric(registry, "pacemaker_session_evictions_total", reason="lru") == 0
    clock.now += 1
    await add(store, (7, "last"), data)  # past 95 %
    held = store.total_bytes
    assert held <= 0.80 * 100_000 and held > 0.80 * 100_000 - 2 * size
    evicted = count + 1 - len(store)
    assert evicted > 0 and metric(registry, "pacemaker_session_evictions_total", reason="lru") == evicted
    kept = {info.id for info in (await store.page(7, None, 500)).sessions}
    # Exactly the least recently used went: s001, s002, ... in order; s000 was used, and "last" is newest.
    assert kept == {"s000", "last"} | {f"s{n:03d}" for n in range(evicted + 1, count)}
    assert metric(registry, "pacemaker_session_bytes") == held
    assert "evicted" in caplog.text


async def test_a_session_over_its_bound_drops_its_oldest_whole_turns() -> None:
    store, registry = pool(max_session_bytes=1000)
    turns = [turn(str(n), 300) for n in range(5)]
    for n, data in enumerate(turns):
        await add(store, (1, "s"), data, task=f"t{n}")
    found = await store.read((1, "s"))
    assert found is not None
    info, kept = found
    assert kept == turns[-(1000 // len(turns[0])) :]
    assert info.bytes == sum(map(len, kept)) <= 1000 and info.tokens == sum(map(turn_tokens, kept))
    assert metric(registry, "pacemaker_session_evictions_total", reason="size") == len(turns) - len(kept)
    refused = await store.finish((1, "s"), "big", turn("", 2000))
    assert (refused.stored, refused.reason) == (False, "turn_too_large")
    assert (await store.read((1, "s"))) == found


async def test_one_turn_at_a_time_and_only_the_holder_releases() -> None:
    clock = FakeClock()
    store, _ = pool(clock)
    key = (1, "s")
    await store.begin(key, "first", 10)
    with pytest.raises(SessionBusy) as busy:
        await store.begin(key, "second", 10)
    assert busy.value.status == 409 and busy.value.extra == {"task_id": "first"} and busy.value.retry_after
    with pytest.raises(SessionBusy):
        await store.delete(key)
    await store.release(key, "second")  # not the holder: nothing happens
    with pytest.raises(SessionBusy):
        await store.begin(key, "second", 10)
    clock.now += 11  # the hold lapsed (the task's timeout): the next turn may go
    await store.begin(key, "second", 10)
    late = await store.finish(key, "first", turn("late"))
    assert (late.stored, late.reason) == (False, "hold_expired")
    assert (await store.finish(key, "second", turn("mine"))).stored
    await store.begin(key, "third", 10)
    await store.release(key, "third")
    assert await store.delete(key) and not await store.delete(key)


async def test_sessions_are_per_key_and_listed_in_pages() -> None:
    store, _ = pool()
    for name in ("b", "a", "c"):
        await add(store, (1, name), turn(name))
    await add(store, (2, "a"), turn("other key"))
    first = await store.page(1, None, 2)
    assert [s.id for s in first.sessions] == ["a", "b"] and first.next_after == "b"
    second = await store.page(1, first.next_after, 2)
    assert [s.id for s in second.sessions] == ["c"] and second.next_after is None
    mine, theirs = await store.read((1, "a")), await store.read((2, "a"))
    assert mine is not None and theirs is not None and mine[1] != theirs[1]


# Run in a fresh interpreter, so that nothing else this process holds blurs the figure.
_RSS_PROGRAM = """
import asyncio, gc, json, sys
import psutil
from prometheus_client import CollectorRegistry
from app.sessions.base import encode_turn
from app.sessions.memory import MemorySessionStore
from app.sessions.metrics import SessionMetrics
from app.sessions.settings import SessionsSettings

SESSIONS, MAX_BYTES = int(sys.argv[1]), int(sys.argv[2])

async def main():
    store = MemorySessionStore(SessionsSettings(max_bytes=MAX_BYTES), SessionMetrics.register(CollectorRegistry()))
    gc.collect()
    before = psutil.Process().memory_info().rss
    for n in range(SESSIONS):
        key = (n % 50, f"session-{n}")
        await store.begin(key, "t", 60)
        turn = encode_turn([{"role": "user", "content": f"hello {n}"}, {"role": "assistant", "content": "hi there"}])
        await store.finish(key, "t", turn)
    gc.collect()
    rss = psutil.Process().memory_info().rss - before
    print(json.dumps({"rss": rss, "stored": store.total_bytes, "sessions": len(store)}))

asyncio.run(main())
"""


def test_100000_small_sessions_stay_within_the_bound_plus_the_documented_overhead() -> None:
    sessions, max_bytes = 100_000, 64 * 1024 * 1024
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROGRAM, str(sessions), str(max_bytes)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(done.stdout)
    assert figures["sessions"] == sessions and figures["stored"] <= max_bytes
    per_session = (figures["rss"] - figures["stored"]) / sessions
    print(f"stored {figures['stored'] / sessions:.0f} B/session, RSS {figures['rss'] / sessions:.0f} B/session")
    # The README documents about 600 bytes per session beyond its stored turns; twice that fails.
    assert figures["rss"] <= figures["stored"] + sessions * 1200, (figures, per_session)
