"""Hostile guests through a real server: it keeps accepting connections, and the python tool's breaker stays closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import PacemakerServer, server_config, start_pacemaker
from tests.test_sandbox import watch_disk

MIB = 1024 * 1024
WORKSPACE_MB = 2
SESSION = "abuse"

# Each holds what it took until its deadline where nothing stops it (today's fd flood kept the
# host's descriptors for the whole run), and each is bounded so that today's code finishes too.
HOSTILE: dict[str, tuple[str, str]] = {
    "exit-200": ("print('partial')\nraise SystemExit(200)", "error"),
    "exit-255": ("print('partial')\nraise SystemExit(255)", "error"),
    "exit-minus-1": ("print('partial')\nraise SystemExit(-1)", "error"),
    "fd-flood": (
        "import time\nheld = []\ntry:\n    while True:\n        held.append(open('/main.py'))\n"
        "except OSError:\n    time.sleep(3)",
        "sandbox_file_limit",
    ),
    "disk-flood": (
        "f = open('big', 'wb')\nfor _ in range(256):\n    f.write(b'x' * (1 << 20))\n    f.flush()",
        "sandbox_disk_limit",
    ),
    "workspace-flood": (
        "f = open('/workspace/big', 'wb')\nfor _ in range(64):\n    f.write(b'x' * (1 << 20))\n    f.flush()",
        "sandbox_workspace_limit",
    ),
}
EXIT_CODES = {"exit-200": 200, "exit-255": 255, "exit-minus-1": -1}


@pytest.fixture(scope="module")
def abuse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacemakerServer]:
    """Default breakers (10 calls, 50 % failures open it) and file caps; small disk caps to keep the floods quick."""
    workdir = tmp_path_factory.mktemp("abuse")
    sandbox = {"max_write_bytes": 8 * MIB, "session_workspace_mb": WORKSPACE_MB, "sessions_dir": str(workdir / "ws")}
    started = start_pacemaker(workdir, server_config(workdir, None, sandbox=sandbox))
    yield started
    started.process.stop()


async def invoke(http: httpx.AsyncClient, code: str, session_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"arguments": {"code": code, "timeout_s": 5}}
    if session_id is not None:
        body["session_id"] = session_id
    response = await http.post("/v1/tools/python/invoke", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


async def poll_health(base_url: str, stop: asyncio.Event) -> list[int | str]:
    """GET /health every ~50 ms, each on a new connection: the HTTP status, or the connection error's name."""
    outcomes: list[int | str] = []
    while not stop.is_set():
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=5) as fresh:
                outcomes.append((await fresh.get("/health")).status_code)
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)
        await asyncio.sleep(0.05)
    return outcomes


@pytest.mark.parametrize("kind", HOSTILE)
async def test_a_hostile_guest_is_an_ordinary_tool_error_while_health_answers_every_poll(
    abuse_server: PacemakerServer, kind: str
) -> None:
    """Its status is the call's error, its output kept; /health on new connections is 200 throughout."""
    code, expected = HOSTILE[kind]
    session = SESSION if kind == "workspace-flood" else None
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(abuse_server.base_url, stop))
    await asyncio.sleep(0.2)
    async with abuse_server.client() as http:
        with watch_disk(abuse_server.workdir / "ws") as workspace_peak:
            reply = await invoke(http, code, session)
    await asyncio.sleep(0.2)
    stop.set()
    health = await poller
    assert reply["error"] == expected and reply["result"]["status"] == expected, reply
    if kind in EXIT_CODES:
        assert (reply["result"]["exit_code"], reply["result"]["stdout"]) == (EXIT_CODES[kind], "partial\n")
    assert workspace_peak["bytes"] <= WORKSPACE_MB * MIB
    assert len(health) >= 4 and set(health) == {200}, health


async def test_fifty_hostile_calls_leave_the_breaker_closed_for_everyone(abuse_server: PacemakerServer) -> None:
    """Guest outcomes are the caller's business: after 50 of them from key A, key B's program runs (no circuit_open)."""
    other = json.loads(abuse_server.cli("keys", "create", "--name", "bystander", "--json").stdout)["key"]
    kinds = list(HOSTILE) * 9  # exit statuses first in each round: today they are breaker failures
    slots = asyncio.Semaphore(4)

    async def hostile(http: httpx.AsyncClient, kind: str) -> str:
        async with slots:
            code, _expected = HOSTILE[kind]
            reply = await invoke(http, code, SESSION if kind == "workspace-flood" else None)
            return str(reply["error"])

    async with abuse_server.client() as attacker, abuse_server.client(key=other) as bystander:
        errors = await asyncio.gather(*(hostile(attacker, kind) for kind in kinds[:50]))
        good = await bystander.post("/v1/tools/python/invoke", json={"arguments": {"code": "print('still here')"}})
    assert errors == [HOSTILE[kind][1] for kind in kinds[:50]]
    assert good.status_code == 200, good.text
    assert good.json()["error"] is None and good.json()["result"]["stdout"] == "still here\n"
