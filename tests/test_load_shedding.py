"""Load shedding: while the event loop lags (or the process is too large) new work gets 503 overloaded
with Retry-After, work already admitted goes on, health answers throughout, and admission opens again
once the lag falls back."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.observability.metrics import Metrics
from app.overload import LoadShedder
from tests.support import ROOT, read_sse, server_config, start_pacemaker

SLOW = "#delay=0.1 #tokens=50"  # about 5 s of tokens from the fake upstream


def _quiet_second(shedder: LoadShedder, start: float, lag_s: float = 0.001) -> float:
    now = start
    for _ in range(41):
        now += 0.025
        shedder.observe(now, lag_s)
    return now


def test_a_loop_that_stays_late_sheds_and_one_stall_does_not() -> None:
    metrics = Metrics()
    shedder = LoadShedder(metrics, max_loop_lag_ms=50, max_rss_mb=None)
    now = _quiet_second(shedder, 0.0)
    shedder.observe(now + 0.025, 0.4)  # one collection or one slow callback: the p90 ignores it
    assert shedder.reason is None and shedder.refusal() is None
    now = _quiet_second(shedder, now + 0.025, lag_s=0.08)  # a loop late at every turn
    assert shedder.reason == "loop_lag"
    refusal = shedder.refusal()
    assert refusal is not None and refusal.status == 503 and refusal.code == "overloaded"
    assert refusal.retryable and refusal.retry_after == 1.0
    assert metrics.shedding._value.get() == 1
    assert metrics.shed_requests.labels("loop_lag")._value.get() == 1
    _quiet_second(shedder, now)  # the lag falls back: admission opens again
    assert shedder.reason is None and shedder.refusal() is None
    assert metrics.shedding._value.get() == 0


def test_a_process_above_its_rss_threshold_sheds_until_it_is_below() -> None:
    rss = {"bytes": 600 * 1024 * 1024}
    shedder = LoadShedder(Metrics(), max_loop_lag_ms=None, max_rss_mb=512, rss=lambda: rss["bytes"])
    shedder.refresh_rss()
    shedder.observe(1.0, 0.001)
    assert shedder.reason == "rss" and shedder.refusal() is not None
    rss["bytes"] = 400 * 1024 * 1024
    shedder.refresh_rss()
    shedder.observe(1.025, 0.001)
    assert shedder.reason is None


def test_off_by_default_but_the_lag_is_measured() -> None:
    metrics = Metrics()
    shedder = LoadShedder(metrics, max_loop_lag_ms=None, max_rss_mb=None)
    _quiet_second(shedder, 0.0, lag_s=5.0)
    assert shedder.reason is None
    assert metrics.loop_lag._value.get() == 5.0


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


async def test_a_flood_past_the_cpu_is_shed_while_streams_and_health_go_on(tmp_path: Path, fake_upstream: str) -> None:
    config = server_config(
        tmp_path,
        fake_upstream,
        server={"shed_loop_lag_ms": 25},
        # Neither the key's rate nor its concurrency may refuse the flood before the shedder does.
        limits={"rpm": None, "max_concurrency": 1000},
    )
    server = start_pacemaker(tmp_path, config)
    try:
        async with server.client() as http:
            quiet = await http.get("/metrics")
            assert _metric(quiet.text, "pacemaker_load_shedding") == 0
            assert _metric(quiet.text, "pacemaker_event_loop_lag_seconds") < 0.025

            admitted = asyncio.Event()

            async def stream() -> list[str]:
                body = {"query": f"in flight {SLOW}", "model": "fake-model", "stream": True}
                deadline = time.monotonic() + 10
                while True:
                    async with http.stream("POST", "/v1/tasks", json=body) as response:
                        if response.status_code == 503 and time.monotonic() < deadline:
                            # Shed before the flood by a lag spike of a busy machine (the threshold is
                            # 25 ms): this stream is the one admitted before it, so it asks again.
                            await response.aread()
                            await asyncio.sleep(0.2)
                            continue
                        assert response.status_code == 200, await response.aread()
                        admitted.set()
                        return [event.event or "" async for event in read_sse(response)]

            health: list[tuple[int, float]] = []
            flooding = True

            async def poll_health() -> None:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as probe:
                    while flooding:
                        started = time.monotonic()
                        response = await probe.get("/health")
                        health.append((response.status_code, time.monotonic() - started))
                        await asyncio.sleep(0.1)

            in_flight = asyncio.create_task(stream())
            await asyncio.wait_for(admitted.wait(), 15)
            await asyncio.sleep(0.5)  # under way before the flood
            poller = asyncio.create_task(poll_health())
            # 128 clients posting tasks back to back from their own process: far past one core.
            flood = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.fakes.flood",
                server.base_url,
                server.key,
                "--concurrency",
                "128",
                "--seconds",
                "4",
                cwd=ROOT,
                stdout=subprocess.PIPE,
            )
            out, _ = await flood.communicate()
            outcomes = json.loads(out)
            during = (await http.get("/metrics")).text  # the lag is still in the last second's samples
            flooding = False
            await poller
            events = await in_flight

            # The flood was shed with a retryable 503 and nothing else went wrong.
            assert outcomes.get("503 overloaded", 0) > 0, outcomes
            assert set(outcomes) <= {"200", "503 overloaded"}, outcomes
            assert _metric(during, 'pacemaker_shed_requests_total{reason="loop_lag"}') > 0
            # The stream admitted before the flood was never cut.
            assert events[-1] == "task.completed", events
            # Health was never shed.
            assert health and all(status == 200 for status, _ in health), health

            # Admission opens again once the loop is on time.
            deadline = time.monotonic() + 10
            while True:
                response = await http.post("/v1/tasks", json={"query": "after the flood"})
                if response.status_code == 200:
                    break
                assert response.json()["code"] == "overloaded"
                assert time.monotonic() < deadline, "still shedding 10 s after the flood"
                await asyncio.sleep(0.2)
            after = (await http.get("/metrics")).text
            assert _metric(after, "pacemaker_load_shedding") == 0
            ready = (await http.get("/health/ready")).json()
            assert ready["checks"]["load"] == "ok"
        log = server.process.output()
        assert "load shedding started: loop_lag" in log and "load shedding stopped" in log
    finally:
        server.process.stop()
