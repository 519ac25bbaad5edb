"""A budget survives restarts and lost limiter state: real servers refuse at the point an uninterrupted run does."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from app.config import DatabaseSettings
from app.db import create_engine
from tests.support import PacemakerServer, RedisServer, fresh_postgres_database, server_config, start_pacemaker
from tests.test_budget_seed import add_rows

# fake-model costs 1 USD per million prompt tokens and 2 per million completion tokens: each call
# reserves about 0.0002 USD (max_tokens 100) and costs about 0.0001 (50 tokens); 0.0015 USD is
# spent after a dozen calls.
BUDGET = "0.0015"
BODY = {"model": "fake-model", "max_tokens": 100, "messages": [{"role": "user", "content": "spend #tokens=50"}]}
# Breakers and retries out of the way; no Python sandbox to start, it plays no part here.
SERVER = {"breakers": {"min_calls": 1_000_000}, "retries": {"max_retries": 0}, "tools": {"python": False}}


@dataclass
class Deployment:
    """One Pacemaker server (restartable) on its database, and a Redis of the test's own or none."""

    workdir: Path
    config: dict[str, Any]
    redis: RedisServer | None
    server: PacemakerServer | None = None

    def start(self) -> PacemakerServer:
        # Same workdir and database: the keys and the audit log survive, the limiter's memory does not.
        self.server = start_pacemaker(self.workdir, self.config)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.process.stop()  # SIGTERM: the audit sink writes its queue before exiting
            self.server = None

    def key(self, *limits: str) -> tuple[int, str]:
        assert self.server is not None
        created = json.loads(
            self.server.cli("keys", "create", "--name", uuid.uuid4().hex[:8], "--json", *limits).stdout
        )
        return int(created["id"]), str(created["key"])


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, fake_upstream: str) -> Iterator[Deployment]:
    overrides: dict[str, Any] = dict(SERVER)
    if request.param == "sqlite":
        # The embedded default: limits in process memory, the audit log in SQLite.
        yield from _running(Deployment(tmp_path, server_config(tmp_path, fake_upstream, **overrides), None))
        return
    redis = RedisServer(tmp_path)
    redis.start()
    with fresh_postgres_database("budget") as url:
        overrides.update(database={"url": url}, limits={"redis_url": redis.url})
        try:
            yield from _running(Deployment(tmp_path, server_config(tmp_path, fake_upstream, **overrides), redis))
        finally:
            redis.stop()


def _running(deployment: Deployment) -> Iterator[Deployment]:
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


async def spend(server: PacemakerServer, key: str, *, limit: int = 100) -> tuple[int, Decimal]:
    """Calls, one at a time, until the first refusal (402 budget_exceeded): how many passed, and their cost."""
    passed, cost = 0, Decimal(0)
    async with server.client(key=key) as http:
        for _ in range(limit):
            response = await http.post("/v1/chat/completions", json=BODY)
            if response.status_code == 402:
                assert response.json()["error"]["code"] == "budget_exceeded"
                return passed, cost
            assert response.status_code == 200, response.text
            passed, cost = passed + 1, cost + Decimal(response.headers["x-pacemaker-cost-usd"])
    raise AssertionError(f"no refusal after {limit} calls")


async def spend_some(server: PacemakerServer, key: str, calls: int) -> Decimal:
    cost = Decimal(0)
    async with server.client(key=key) as http:
        for _ in range(calls):
            response = await http.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text
            cost += Decimal(response.headers["x-pacemaker-cost-usd"])
    return cost


async def test_a_restart_refuses_at_the_same_point_as_an_uninterrupted_run(deployment: Deployment) -> None:
    assert deployment.server is not None
    _, reference = deployment.key("--budget-usd", BUDGET)
    _, restarted = deployment.key("--budget-usd", BUDGET)
    expected, expected_cost = await spend(deployment.server, reference)
    assert expected >= 6, expected

    before = await spend_some(deployment.server, restarted, expected // 2)
    deployment.stop()
    if deployment.redis is not None:
        deployment.redis.kill()  # no persistence: every limit starts empty
        deployment.redis.start()
    after, after_cost = await spend(deployment.start(), restarted)

    assert (expected // 2 + after, before + after_cost) == (expected, expected_cost)
    assert before + after_cost <= Decimal(BUDGET)


async def test_a_flushed_redis_refuses_at_the_same_point(tmp_path: Path, fake_upstream: str) -> None:
    redis = RedisServer(tmp_path)  # our own: the machine's shared Redis is never flushed
    redis.start()
    try:
        with fresh_postgres_database("budget") as url:
            config = server_config(
                tmp_path,
                fake_upstream,
                database={"url": url},
                limits={"redis_url": redis.url},
                # Rows wait for their batch the whole test: the seed must count this process's unwritten rows.
                audit={"flush_interval_s": 60},
                **SERVER,
            )
            deployment = Deployment(tmp_path, config, redis)
            server = deployment.start()
            try:
                _, reference = deployment.key("--budget-usd", BUDGET, "--budget-period", "month")
                _, flushed = deployment.key("--budget-usd", BUDGET, "--budget-period", "month")
                expected, expected_cost = await spend(server, reference)
                before = await spend_some(server, flushed, expected // 2)
                client = Redis.from_url(redis.url)
                try:
                    await client.flushall()
                finally:
                    await client.aclose()
                after, after_cost = await spend(server, flushed)
            finally:
                deployment.stop()
    finally:
        redis.stop()
    assert (expected // 2 + after, before + after_cost) == (expected, expected_cost)


async def test_a_period_budget_is_seeded_only_from_the_spend_of_its_period(tmp_path: Path, fake_upstream: str) -> None:
    config = server_config(tmp_path, fake_upstream, **SERVER)
    deployment = Deployment(tmp_path, config, None)
    server = deployment.start()
    try:
        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        engine = create_engine(DatabaseSettings(url=config["database"]["url"]))
        answers: dict[tuple[str, str], int] = {}
        try:
            for period, start in (("day", day), ("month", month)):
                for today in ("0.9999", "0.99"):  # what is left: less than one call's reservation, or plenty
                    key_id, key = deployment.key("--budget-usd", "1", "--budget-period", period)
                    # Five times the budget just before the period began: another period's spend.
                    await add_rows(engine, key_id, start - timedelta(microseconds=1), [Decimal(5)])
                    await add_rows(engine, key_id, start, [Decimal(today)])
                    async with server.client(key=key) as http:
                        answers[(period, today)] = (await http.post("/v1/chat/completions", json=BODY)).status_code
        finally:
            await engine.dispose()
    finally:
        deployment.stop()
    assert answers == {("day", "0.9999"): 402, ("day", "0.99"): 200, ("month", "0.9999"): 402, ("month", "0.99"): 200}
