"""Pacemaker in a real headless Chromium: cross-origin fetch and WebSocket, the offline docs, the web example."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, expect

from tests.browser import BrowserPage, browser, open_page
from tests.support import ROOT, ManagedProcess, PacemakerServer, free_port, server_config, start_pacemaker

__all__ = ["browser"]  # the session's browser fixture, used by every test here

EXAMPLE_DIR = ROOT / "examples" / "web"
SOME_TEXT = re.compile(r"[\s\S]{30,}")  # a part of an answer


@dataclass
class Site:
    """Static pages served by `python -m http.server` (as the README runs the example), on an origin of their own."""

    process: ManagedProcess
    origin: str

    def url(self, path: str = "") -> str:
        return f"{self.origin}/{path}"


def serve_directory(directory: Path, log_dir: Path, name: str) -> Site:
    port = free_port()
    args = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(directory), str(port)]
    process = ManagedProcess(args, {"PATH": "/usr/bin:/bin"}, log_dir / f"{name}-{port}.log")
    process.wait_for_port(port)
    return Site(process, f"http://127.0.0.1:{port}")


@dataclass
class World:
    server: PacemakerServer
    allowed: Site  # an origin in server.cors.allow_origins
    refused: Site  # one that is not
    example: Site  # examples/web, allowed


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("browser")
    pages = workdir / "pages"
    pages.mkdir()
    (pages / "index.html").write_text("<!doctype html><title>another origin</title><p>A page of another origin.</p>")
    sites = [serve_directory(pages, workdir, "allowed"), serve_directory(pages, workdir, "refused")]
    sites.append(serve_directory(EXAMPLE_DIR, workdir, "example"))
    allowed, refused, example = sites
    config = server_config(
        workdir,
        None,
        server={"access_log": True, "cors": {"allow_origins": [allowed.origin, example.origin]}},
        # Paced, so that a page can be reloaded while its task streams.
        providers={"simulated": {"kind": "simulated", "tokens_per_second": 25}},
        models={
            name: {"provider": "simulated", "input_usd_per_mtok": "3", "output_usd_per_mtok": "15"}
            for name in ("sim-small", "sim-medium", "sim-large")
        },
    )
    server = start_pacemaker(workdir, config)
    yield World(server, allowed, refused, example)
    server.process.stop()
    for site in sites:
        site.process.stop()


# A task streamed by fetch() from the page, its SSE parsed as it arrives; what the page saw.
STREAM_FROM_PAGE = """
async ([base, key, query]) => {
  try {
    const response = await fetch(base + "/v1/tasks", {
      method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({query, stream: true}),
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", chunks = 0, deltas = [], last = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      chunks += 1;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const data = buffer.slice(0, end).split("\\n").find((line) => line.startsWith("data: "));
        buffer = buffer.slice(end + 2);
        if (!data) continue;
        last = JSON.parse(data.slice(6));
        if (last.type === "token.delta") deltas.push(last.delta);
      }
    }
    return {status: response.status, requestId: response.headers.get("x-request-id"), chunks, deltas, last};
  } catch (error) {
    return {error: String(error)};
  }
}
"""

OPEN_SOCKET_FROM_PAGE = """
([url, key]) => new Promise((resolve) => {
  const socket = new WebSocket(url, ["pacemaker.bearer", key]);
  const seen = [];
  socket.onopen = () => socket.send(JSON.stringify({type: "task.create", query: "hello from a page"}));
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    seen.push(event.type);
    if (event.type === "task.completed" || event.type === "task.failed") socket.close();
  };
  socket.onclose = (close) => resolve({protocol: socket.protocol, code: close.code, seen});
})
"""


def ws_url(server: PacemakerServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/ws"


async def tasks_with_query(server: PacemakerServer, query: str) -> list[dict[str, Any]]:
    async with server.client() as http:
        response = await http.get("/v1/tasks", params={"limit": 100})
    assert response.status_code == 200
    return [task for task in response.json()["data"] if task["query"] == query]


async def test_the_browser_reaches_no_other_host(browser: Browser, world: World, tmp_path: Path) -> None:
    """The fixture's own promise: a page's requests to other hosts fail in the browser, and are recorded."""
    attempt = """async () => {
      const outcome = {};
      try { await fetch("http://example.com/", {mode: "no-cors"}); outcome.fetch = "sent"; }
      catch (error) { outcome.fetch = String(error); }
      outcome.socket = await new Promise((resolve) => {
        const socket = new WebSocket("ws://203.0.113.7/socket");
        socket.onopen = () => resolve("open");
        socket.onclose = (close) => resolve(close.code);
      });
      return outcome;
    }"""
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.allowed.url())
        outcome = await tab.page.evaluate(attempt)
    assert outcome == {"fetch": "TypeError: Failed to fetch", "socket": 1006}
    assert tab.requests_to_other_hosts() == ["http://example.com/", "ws://203.0.113.7/socket"]
    assert any(failure.startswith("http://example.com/ net::ERR_") for failure in tab.failed), tab.failed


async def test_a_page_of_an_allowed_origin_streams_a_task_with_fetch(
    browser: Browser, world: World, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.allowed.url())
        seen = await tab.page.evaluate(STREAM_FROM_PAGE, [world.server.base_url, world.server.key, "stream me"])
        await tab.screenshot("allowed-origin")
    assert "error" not in seen, seen
    assert seen["status"] == 200
    assert seen["last"]["type"] == "task.completed"
    assert "".join(seen["deltas"]) == seen["last"]["output"]
    assert seen["chunks"] > 1  # read as it arrived, not at the end
    assert seen["requestId"]  # an exposed header the page may read
    assert tab.requests_to_other_hosts() == []


async def test_a_page_of_another_origin_is_refused_by_the_browser(
    browser: Browser, world: World, tmp_path: Path
) -> None:
    query = "a page that may not call"
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.refused.url())
        seen = await tab.page.evaluate(STREAM_FROM_PAGE, [world.server.base_url, world.server.key, query])
    # fetch() rejects with a TypeError, and Chromium says why in the console.
    assert "TypeError: Failed to fetch" in seen.get("error", ""), seen
    assert "blocked by CORS policy" in tab.console_text()
    # The preflight was refused, so the task itself was never sent.
    assert await tasks_with_query(world.server, query) == []


async def test_the_websocket_refuses_another_origin_and_serves_an_allowed_one(
    browser: Browser, world: World, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.refused.url())
        refused = await tab.page.evaluate(OPEN_SOCKET_FROM_PAGE, [ws_url(world.server), world.server.key])
        await tab.page.goto(world.allowed.url())
        served = await tab.page.evaluate(OPEN_SOCKET_FROM_PAGE, [ws_url(world.server), world.server.key])
    assert refused["seen"] == [] and refused["code"] == 1006  # the page is told only that it failed...
    assert "Unexpected response code: 403" in tab.console_text()  # ...the browser says it was a 403
    assert served["protocol"] == "pacemaker.bearer"  # the key went as the second entry, never echoed
    assert served["seen"][0] == "task.started" and served["seen"][-1] == "task.completed"


async def test_the_api_docs_render_with_the_network_to_other_hosts_blocked(
    browser: Browser, world: World, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=world.server.base_url) as http:
        schema = (await http.get("/openapi.json")).json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.server.base_url + "/docs")
        await expect(tab.page.locator(".opblock")).to_have_count(operations)
        await tab.screenshot("swagger-ui")

        # "Try it out" with the default example, after entering the key in Authorize.
        await tab.page.locator("button.authorize").first.click()
        dialog = tab.page.locator(".auth-container").filter(has_text="BearerAuth")
        await dialog.locator("input").fill(world.server.key)
        await dialog.locator("button.authorize").click()
        await dialog.locator("button.btn-done").click()
        operation = tab.page.locator(".opblock-post").filter(has=tab.page.locator('[data-path="/v1/tasks"]'))
        await operation.locator(".opblock-summary").click()
        await operation.locator("button.try-out__btn").click()
        await operation.locator("button.execute").click()
        response = operation.locator(".live-responses-table .response")
        await expect(response.locator(".response-col_status")).to_have_text("200", timeout=20_000)
        await expect(response.locator(".response-col_description")).to_contain_text('"status": "completed"')
        await tab.screenshot("swagger-ui-try-it-out")

        await tab.page.goto(world.server.base_url + "/redoc")
        await expect(tab.page.get_by_role("heading", name="Run a task").first).to_be_visible(timeout=20_000)
        await tab.screenshot("redoc", full_page=False)
    assert tab.requests_to_other_hosts() == []
    assert tab.errors == []
    assets = [seen.url for seen in tab.requests if "/docs/assets/" in seen.url]
    assert any(url.endswith("swagger-ui-bundle.js") for url in assets)
    assert any(url.endswith("redoc.standalone.js") for url in assets)


async def wait_for_status(tab: BrowserPage, state: str, timeout_ms: float = 30_000) -> None:
    await expect(tab.page.locator("#status")).to_have_attribute("data-state", state, timeout=timeout_ms)


async def test_the_web_example_runs_a_task_end_to_end(browser: Browser, world: World, tmp_path: Path) -> None:
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.example.url("index.html"))
        await tab.page.fill("#base-url", world.server.base_url)
        await tab.page.fill("#api-key", world.server.key)
        await tab.page.uncheck("#background")
        await tab.page.click("#send")
        await wait_for_status(tab, "completed")
        await tab.screenshot("example-completed")
        task_id = await tab.page.text_content("#task-id")
        output = await tab.page.text_content("#output")
        tools = await tab.page.locator("#tools li").all_text_contents()
        cost = await tab.page.text_content("#cost")
    async with world.server.client() as http:
        task = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert task["status"] == "completed" and output == task["output"]
    assert tools == ['calculator({"expression":"17 * 23 + 4"}) = {"expression":"17 * 23 + 4","result":395}']
    assert float(task["cost_usd"]) > 0 and cost == f"${float(task['cost_usd']):.6f}"
    assert tab.requests_to_other_hosts() == [] and tab.errors == []


async def test_the_web_example_cancels_a_background_task(browser: Browser, world: World, tmp_path: Path) -> None:
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.example.url("index.html"))
        await tab.page.fill("#base-url", world.server.base_url)
        await tab.page.fill("#api-key", world.server.key)
        await tab.page.fill("#query", "Tell me a long story about agents")
        await tab.page.click("#send")
        await expect(tab.page.locator("#output")).not_to_be_empty()
        await tab.page.click("#cancel")
        await wait_for_status(tab, "cancelled")
        task_id = await tab.page.text_content("#task-id")
    async with world.server.client() as http:
        task = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert task["status"] == "cancelled" and task["background"] is True
    cancels = [seen for seen in tab.requests if seen.method == "POST" and seen.url.endswith(f"/{task_id}/cancel")]
    assert len(cancels) == 1


async def test_the_web_example_resumes_a_background_task_after_a_reload(
    browser: Browser, world: World, tmp_path: Path
) -> None:
    async with open_page(browser, tmp_path) as tab:
        await tab.page.goto(world.example.url("index.html"))
        await tab.page.fill("#base-url", world.server.base_url)
        await tab.page.fill("#api-key", world.server.key)
        await tab.page.fill("#query", "Tell me about agents, at length")
        await tab.page.select_option("#mode", "complex")
        await tab.page.click("#send")
        # Some of the answer has arrived, and the task is still running: leave the page mid-stream.
        await expect(tab.page.locator("#output")).to_have_text(SOME_TEXT)
        before_reload = await tab.page.text_content("#output") or ""
        await tab.page.reload()
        await wait_for_status(tab, "completed")
        await tab.screenshot("example-resumed")
        task_id = await tab.page.text_content("#task-id")
        output = await tab.page.text_content("#output")
        query = await tab.page.input_value("#query")
    async with world.server.client() as http:
        task = (await http.get(f"/v1/tasks/{task_id}")).json()
    # Every token once, in order, across the reload: what the page showed before it, then the rest.
    assert task["background"] is True and output == task["output"]
    assert output.startswith(before_reload) and len(output) > len(before_reload)
    assert query == "Tell me about agents, at length"  # the form is restored too
    resumed = [seen for seen in tab.requests if seen.url.endswith(f"/v1/tasks/{task_id}/events")]
    assert len(resumed) == 1
    assert int(resumed[0].headers["last-event-id"]) > 0


def test_the_key_never_appears_in_the_server_log(world: World) -> None:
    """Run last: the browser tests above sent the key in headers and as a WebSocket subprotocol."""
    log = (world.server.workdir / "server.log").read_text(errors="replace")
    assert "/v1/tasks" in log  # access lines were written (server.access_log)
    assert world.server.key not in log
