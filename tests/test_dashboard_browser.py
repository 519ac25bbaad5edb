"""The live dashboard (GET /dashboard) in a real headless Chromium: offline, live tasks and breakers, restarts."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, expect

from tests.browser import BrowserPage, browser, open_page
from tests.support import ManagedProcess, PacemakerServer, server_config, start_pacemaker

__all__ = ["browser"]  # the session's browser fixture, used by every test here

# The fake upstream's model, as its breaker is named: provider/upstream model.
BREAKER = "upstream:fake/fake-upstream-model"
LIVE_WITHIN_MS = 2_000


@dataclass
class Board:
    server: PacemakerServer
    admin_key: str
    port: int
    starts: int = 1

    def restart(self) -> None:
        """Stop the server and serve again on the same port (same database and keys), as a deploy would."""
        self.server.process.stop()
        self.starts += 1
        log = self.server.workdir / f"server-{self.starts}.log"
        args = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)]
        self.server.process = ManagedProcess(args, self.server.env, log)
        self.server.process.wait_for_port(self.port)

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.server.workdir.glob("server*.log")))


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Board]:
    workdir = tmp_path_factory.mktemp("dashboard")
    config = server_config(
        workdir,
        fake_upstream,
        server={"access_log": True},
        # Opens after two failed calls, and stays open long enough to be seen.
        breakers={"min_calls": 2, "failure_rate_threshold": 0.5, "open_s": 120},
        retries={"max_retries": 0},
        # Paced: a task runs long enough to be seen running.
        providers={"simulated": {"kind": "simulated", "tokens_per_second": 40}},
        models={
            name: {"provider": "simulated", "input_usd_per_mtok": "3", "output_usd_per_mtok": "15"}
            for name in ("sim-small", "sim-medium", "sim-large")
        },
    )
    server = start_pacemaker(workdir, config)
    admin = json.loads(server.cli("keys", "create", "--name", "dashboard", "--admin", "--json").stdout)["key"]
    started = Board(server, admin, int(server.base_url.rsplit(":", 1)[1]))
    yield started
    started.server.process.stop()


async def sign_in(tab: BrowserPage, board: Board) -> None:
    await tab.page.goto(board.server.base_url + "/dashboard")
    await expect(tab.page.locator("#status")).to_have_attribute("data-state", "signed-out")
    await tab.page.fill("#api-key", board.admin_key)
    await tab.page.click("#login button")
    await expect(tab.page.locator("#status")).to_have_attribute("data-state", "live", timeout=10_000)


async def task_record(board: Board, task_id: str) -> dict[str, Any]:
    async with board.server.client() as http:
        record: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}")).json()
    return record


async def test_the_dashboard_shows_a_task_live_and_loads_nothing_from_other_hosts(
    browser: Browser, board: Board, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await sign_in(tab, board)
        async with board.server.client() as http:
            started = time.monotonic()
            accepted = await http.post("/v1/tasks", json={"query": "Tell me about agents", "background": True})
        assert accepted.status_code == 202
        task_id = accepted.json()["id"]
        row = tab.page.locator(f'#tasks tr[data-task-id="{task_id}"]')
        await expect(row).to_be_visible(timeout=LIVE_WITHIN_MS)
        seen_after = time.monotonic() - started
        assert seen_after < LIVE_WITHIN_MS / 1000, seen_after
        await expect(row).to_have_attribute("data-status", "running")  # it is paced: still running

        # Clicking it follows its events through `subscribe`: the token stream as it arrives.
        await row.click()
        await expect(tab.page.locator("#detail-output")).not_to_be_empty()
        await expect(row).to_have_attribute("data-status", "completed", timeout=20_000)
        record = await task_record(board, task_id)
        assert record["status"] == "completed" and float(record["cost_usd"]) > 0
        usage = record["usage"]
        await expect(row.locator(".tokens")).to_have_text(f"{usage['prompt_tokens']} · {usage['completion_tokens']}")
        await expect(row.locator(".cost")).to_have_text(f"${float(record['cost_usd']):.6f}")
        await expect(tab.page.locator("#detail-output")).to_have_text(record["output"])
        # The figures of the snapshot: its model's row, and today's cost.
        await expect(tab.page.locator('#models tr[data-model="sim-small"]')).to_be_visible()
        await expect(tab.page.locator("#cost-today")).not_to_have_text("$0.000000")
        await tab.screenshot("dashboard")
        # A phone's width: still one readable column.
        await tab.page.set_viewport_size({"width": 390, "height": 844})
        await tab.screenshot("dashboard-phone")
        width = await tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
    assert tab.requests_to_other_hosts() == []
    assert tab.errors == [], tab.errors
    # One socket, and the key never in its URL (it goes as a subprotocol).
    assert tab.websockets == [board.server.base_url.replace("http://", "ws://") + "/v1/ws"]
    page_assets = sum(1 for seen in tab.requests if "/dashboard/assets/" in seen.url)
    assert page_assets == 4  # uPlot's script and style, the page's own


async def test_clicking_a_plain_task_shows_its_record_as_its_events_are_not_kept(
    browser: Browser, board: Board, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await sign_in(tab, board)
        async with board.server.client() as http:
            result = (await http.post("/v1/tasks", json={"query": "a plain one"})).json()
        row = tab.page.locator(f'#tasks tr[data-task-id="{result["id"]}"]')
        await expect(row).to_have_attribute("data-status", "completed", timeout=LIVE_WITHIN_MS)
        await row.click()
        await expect(tab.page.locator("#detail-state")).to_contain_text("not a background task")
        await expect(tab.page.locator("#detail-output")).to_have_text(result["output"])
    assert tab.requests_to_other_hosts() == [] and tab.errors == []


async def test_a_breaker_that_opens_is_shown_open_within_two_seconds(
    browser: Browser, board: Board, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await sign_in(tab, board)
        async with board.server.client() as http:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "fail #status=500"}]}
            answers = [await http.post("/v1/chat/completions", json=body) for _ in range(3)]
        opened = time.monotonic()
        # Two upstream 500s open it (min_calls 2); the third call is refused by the open breaker.
        assert [answer.status_code for answer in answers] == [502, 502, 503], [a.text for a in answers]
        row = tab.page.locator(f'#breakers tr[data-breaker="{BREAKER}"]')
        await expect(row).to_have_attribute("data-state", "open", timeout=LIVE_WITHIN_MS)
        assert time.monotonic() - opened < LIVE_WITHIN_MS / 1000
        await expect(row.locator(".state")).to_have_text("open")
        await expect(tab.page.locator('#errors tbody tr:has-text("upstream_error")')).to_be_visible()
        await tab.screenshot("breaker-open")
    assert tab.requests_to_other_hosts() == [] and tab.errors == []


async def test_a_non_admin_key_is_turned_away_by_the_page(browser: Browser, board: Board, tmp_path: Path) -> None:
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(board.server.base_url + "/dashboard")
        await tab.page.fill("#api-key", board.server.key)  # the server's plain key
        await tab.page.click("#login button")
        await expect(tab.page.locator("#status")).to_have_attribute("data-state", "refused")
        await expect(tab.page.locator("#notice")).to_contain_text("not an admin key")
        assert await tab.page.evaluate("sessionStorage.length") == 0  # the key is not kept


async def test_the_page_survives_a_server_restart_by_reconnecting(
    browser: Browser, board: Board, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await sign_in(tab, board)
        # The key is in this tab's sessionStorage only, never in localStorage or a cookie.
        stored = await tab.page.evaluate("[sessionStorage.length, localStorage.length, document.cookie]")
        assert stored == [1, 0, ""]
        await asyncio.to_thread(board.restart)
        status = tab.page.locator("#status")
        await expect(status).to_have_attribute("data-state", "live", timeout=30_000)
        assert len(tab.websockets) >= 2  # it reconnected, with no reload
        async with board.server.client() as http:
            accepted = await http.post("/v1/tasks", json={"query": "after the restart", "background": True})
        row = tab.page.locator(f'#tasks tr[data-task-id="{accepted.json()["id"]}"]')
        await expect(row).to_be_visible(timeout=LIVE_WITHIN_MS)
        await tab.screenshot("after-restart")
    assert tab.requests_to_other_hosts() == []


def test_the_key_never_appears_in_the_server_log(board: Board) -> None:
    """Run last: the page sent the admin key as a WebSocket subprotocol and in fetch headers."""
    log = board.logs()
    assert "/dashboard" in log and "/v1/ws" in log  # access lines were written (server.access_log)
    assert board.admin_key not in log
    assert board.server.key not in log


async def test_the_page_and_its_assets_are_small_and_public(board: Board) -> None:
    async with httpx.AsyncClient(base_url=board.server.base_url) as http:
        page = await http.get("/dashboard")
        assets = [
            await http.get(f"/dashboard/assets/{name}")
            for name in ("dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css")
        ]
    assert page.status_code == 200 and all(asset.status_code == 200 for asset in assets)
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    total = len(page.content) + sum(len(asset.content) for asset in assets)
    assert total < 200_000, total
