"""Headless Chromium for tests: Debian's chromium driven by Playwright, each page's network confined to this machine."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from tests.support import IN_CI

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_COMMAND = "apt-get install -y chromium  (or: make chromium)"
# Root cannot use Chromium's sandbox; the rest keeps the browser from calling home on its own.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})


def require_chromium() -> None:
    """A missing chromium fails the run in CI and skips the test elsewhere, naming the install command."""
    if CHROMIUM.is_file():
        return
    message = f"{CHROMIUM} is not installed: {INSTALL_COMMAND}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing browser is a failure)")
    pytest.skip(message)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the session, whose network reaches 127.0.0.1 and localhost only.

    Every other host goes through a proxy at a local port that accepts no connection, so nothing
    leaves the machine, DNS lookups included. (Playwright's request interception would block too,
    but it answers every CORS preflight itself with "allow everything", which no CORS test survives.)
    Each launch gets a fresh profile (user-data dir) of its own.
    """
    require_chromium()
    with socket.socket() as nowhere:  # bound, never listening: a connection to it is refused at once
        nowhere.bind(("127.0.0.1", 0))
        confined = [
            f"--proxy-server=http://127.0.0.1:{nowhere.getsockname()[1]}",
            "--proxy-bypass-list=" + ";".join(sorted(LOCAL_HOSTS)),
        ]
        async with async_playwright() as playwright:
            launched = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=[*LAUNCH_ARGS, *confined], headless=True
            )
            try:
                yield launched
            finally:
                await launched.close()


@dataclass
class SeenRequest:
    method: str
    url: str
    resource_type: str
    headers: dict[str, str]

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass
class BrowserPage:
    """A page whose requests are all recorded (the browser refuses those to other hosts)."""

    page: Page
    context: BrowserContext
    output_dir: Path
    requests: list[SeenRequest] = field(default_factory=list)  # everything asked for, refused or not
    failed: list[str] = field(default_factory=list)  # "<url> <error>" of requests that failed, refused ones too
    websockets: list[str] = field(default_factory=list)  # WebSocket URLs the page opened
    console: list[str] = field(default_factory=list)  # "<type>: <text>" of every console message
    errors: list[str] = field(default_factory=list)  # uncaught exceptions of the page's scripts

    def requests_to_other_hosts(self) -> list[str]:
        """Every URL (HTTP or WebSocket) the page asked for on another host than 127.0.0.1 and localhost."""
        return [url for url in [seen.url for seen in self.requests] + self.websockets if _remote(url)]

    def console_text(self) -> str:
        return "\n".join(self.console)

    async def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        """A PNG of the page in the test's output directory (its tmp_path): `<name>.png`."""
        path = self.output_dir / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path


def _remote(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome-error"):
        return False
    return (parts.hostname or "") not in LOCAL_HOSTS


@contextlib.asynccontextmanager
async def open_page(
    browser: Browser, output_dir: Path, *, viewport: tuple[int, int] = (1280, 900)
) -> AsyncIterator[BrowserPage]:
    """A new page in a context of its own (no cookies or storage shared with other tests), recorded.

    If the block raises, a screenshot `failure.png` is left in `output_dir` for the post-mortem.
    """
    context = await browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = await context.new_page()
    recorded = BrowserPage(page, context, output_dir)

    def note_request(request: Request) -> None:
        recorded.requests.append(SeenRequest(request.method, request.url, request.resource_type, request.headers))

    def note_failure(request: Request) -> None:
        recorded.failed.append(f"{request.url} {request.failure}")

    def note_console(message: ConsoleMessage) -> None:
        recorded.console.append(f"{message.type}: {message.text}")

    context.on("request", note_request)
    context.on("requestfailed", note_failure)
    page.on("console", note_console)
    page.on("websocket", lambda socket: recorded.websockets.append(socket.url))
    page.on("pageerror", lambda error: recorded.errors.append(str(error)))
    try:
        yield recorded
    except BaseException:
        with contextlib.suppress(PlaywrightError):
            await recorded.screenshot("failure")
        raise
    finally:
        await context.close()
