"""GET /v1/audit and GET /v1/usage on a real PostgreSQL, read back from rows the running server wrote."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.support import PacemakerServer, fresh_postgres_database, server_config, start_pacemaker

pytestmark = pytest.mark.postgres

# Prices that give every task a cost with fewer than 9 decimals, so that sums can be compared exactly.
PRICES = {
    "sim-small": (Decimal("0.15"), Decimal("0.6")),
    "sim-medium": (Decimal("1.5"), Decimal("2")),
}
AUDIT_COLUMNS = {
    "id", "request_id", "created_at", "finished_at", "api_key_id", "route", "transport", "task_id", "mode",
    "tier", "model", "provider", "status", "error_code", "http_status", "prompt_tokens", "completion_tokens",
    "usage_estimated", "cost_usd", "latency_ms", "ttft_ms", "tool_call_count", "tool_names", "retries",
    "client_ip", "user_agent", "session_id", "trace_id", "prompt", "output",
}  # fmt: skip
# The sink writes within flush_interval_s (0.2 s); this is how long a test waits for its rows at most.
VISIBLE_WITHIN_S = 5.0


@dataclass
class Audited:
    server: PacemakerServer
    keys: dict[str, str]  # name -> plaintext
    ids: dict[str, int]  # name -> api_key id

    def client(self, name: str) -> httpx.AsyncClient:
        return self.server.client(self.keys[name])


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    """One server on a fresh PostgreSQL database, with an admin key and a key per test."""
    with fresh_postgres_database("pacemaker_audit_api") as url:
        workdir = tmp_path_factory.mktemp("audit-api")
        config = server_config(
            workdir,
            None,
            database={"url": url},
            # Tests fire dozens of tasks at once per key; the default limits would refuse some.
            limits={"rpm": None, "max_concurrency": 100},
            models={
                model: {"input_usd_per_mtok": str(prompt), "output_usd_per_mtok": str(completion)}
                for model, (prompt, completion) in PRICES.items()
            },
        )
        server = start_pacemaker(workdir, config)
        try:
            keys, ids = {}, {}
            for key_name in ("admin", "member", "pager", "filters", "usage", "other"):
                flags = ["--admin"] if key_name == "admin" else []
                created = json.loads(server.cli("keys", "create", "--name", key_name, "--json", *flags).stdout)
                keys[key_name], ids[key_name] = created["key"], created["id"]
            yield Audited(server, keys, ids)
        finally:
            code = server.process.stop()
            assert code in (0, -15), server.process.output()


async def run_tasks(http: httpx.AsyncClient, count: int, **fields: Any) -> list[httpx.Response]:
    responses = await asyncio.gather(
        *(http.post("/v1/tasks", json={"query": f"audit probe {n}", **fields}) for n in range(count))
    )
    for response in responses:
        assert response.status_code == 200, response.text
    return list(responses)


def request_ids(responses: Iterable[httpx.Response]) -> set[str]:
    return {response.headers["x-request-id"] for response in responses}


async def audit_rows(admin: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """Every matching row, in one page (the tests stay well under the 500-row limit)."""
    response = await admin.get("/v1/audit", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_cursor"] is None, "more than one page: narrow the query"
    rows: list[dict[str, Any]] = body["data"]
    return rows


async def wait_for_rows(admin: httpx.AsyncClient, expected: set[str], **params: Any) -> list[dict[str, Any]]:
    """The rows matching params once every expected request id is among them (the sink writes in batches)."""
    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while True:
        rows = await audit_rows(admin, **params)
        missing = expected - {row["request_id"] for row in rows}
        if not missing:
            return rows
        assert time.monotonic() < deadline, f"{len(missing)} audit rows not written within {VISIBLE_WITHIN_S}s"
        await asyncio.sleep(0.05)


def ids_of(rows: Iterable[dict[str, Any]]) -> set[str]:
    return {row["request_id"] for row in rows}


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


async def test_audit_refuses_a_non_admin_key_with_403_and_a_missing_key_with_401(audited: Audited) -> None:
    async with audited.client("member") as member:
        refused = await member.get("/v1/audit")
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "forbidden"
    async with httpx.AsyncClient(base_url=audited.server.base_url) as anonymous:
        unauthenticated = await anonymous.get("/v1/audit")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["code"] == "invalid_api_key"
    async with audited.client("admin") as admin:
        assert (await admin.get("/v1/audit", params={"limit": 1})).status_code == 200


async def test_paging_returns_every_row_exactly_once_while_new_rows_arrive(audited: Audited) -> None:
    pager = audited.ids["pager"]
    async with audited.client("pager") as http, audited.client("admin") as admin:
        await wait_for_rows(admin, request_ids(await run_tasks(http, 60)), api_key_id=pager)
        existing = {row["id"] for row in await audit_rows(admin, api_key_id=pager)}
        seen: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            # New rows for the same key are written while the pages are read.
            arrivals = asyncio.create_task(run_tasks(http, 3))
            params: dict[str, Any] = {"api_key_id": pager, "limit": 7}
            if cursor is not None:
                params["cursor"] = cursor
            response = await admin.get("/v1/audit", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert 0 < len(page["data"]) <= 7
            seen += [row["id"] for row in page["data"]]
            await arrivals
            await asyncio.sleep(0.3)  # past the sink's flush interval: the arrivals are in the table now
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        final = {row["id"] for row in await audit_rows(admin, api_key_id=pager)}
    assert len(seen) == len(set(seen)), "a row came twice"
    assert existing <= set(seen), "a row that existed before paging began was skipped"
    assert seen == sorted(seen, reverse=True)
    assert len(existing) == 60
    assert len(final) == 60 + 3 * pages > len(seen), "rows arrived while paging, and later pages did not show them"


async def test_filters_by_status_model_key_and_time_range(audited: Audited) -> None:
    key = audited.ids["filters"]
    async with audited.client("filters") as http, audited.client("admin") as admin:
        async with httpx.AsyncClient(base_url=audited.server.base_url) as anonymous:
            unauthenticated = [await anonymous.post("/v1/tasks", json={"query": "who am I"}) for _ in range(2)]
        invalid = [await http.post("/v1/tasks", json={"query": " "}) for _ in range(2)]
        assert {r.status_code for r in unauthenticated} == {401} and {r.status_code for r in invalid} == {422}
        small = await run_tasks(http, 3)
        await asyncio.sleep(0.05)
        boundary = datetime.now(UTC)
        await asyncio.sleep(0.05)
        medium = await run_tasks(http, 2, model="sim-medium")

        rows = await wait_for_rows(admin, request_ids([*small, *medium, *invalid]), api_key_id=key)
        assert ids_of(rows) == request_ids([*small, *medium, *invalid])
        assert {row["api_key_id"] for row in rows} == {key}
        assert all(set(row) == AUDIT_COLUMNS for row in rows)
        completed = next(row for row in rows if row["request_id"] in request_ids(medium))
        assert (completed["model"], completed["provider"], completed["status"]) == (
            "sim-medium",
            "simulated",
            "completed",
        )
        assert completed["route"] == "/v1/tasks" and completed["http_status"] == 200
        assert isinstance(completed["tool_names"], list)
        assert Decimal(completed["cost_usd"]) > 0 and len(completed["cost_usd"].split(".")[1]) == 9
        assert datetime.fromisoformat(completed["created_at"]).utcoffset() == timedelta(0)

        # 422s are rejected rows of the key that sent them; 401s are rejected rows of no key.
        rejected_own = await audit_rows(admin, api_key_id=key, status="rejected")
        assert ids_of(rejected_own) == request_ids(invalid)
        assert {(row["http_status"], row["error_code"]) for row in rejected_own} == {(422, "invalid_request")}
        rejected = await wait_for_rows(admin, request_ids(unauthenticated), status="rejected")
        anonymous_rows = [row for row in rejected if row["request_id"] in request_ids(unauthenticated)]
        assert {(row["api_key_id"], row["http_status"]) for row in anonymous_rows} == {(None, 401)}
        assert {row["status"] for row in rejected} == {"rejected"}
        completed_rows = await audit_rows(admin, api_key_id=key, status="completed")
        assert ids_of(completed_rows) == request_ids([*small, *medium])

        by_model = await audit_rows(admin, model="sim-medium")
        assert request_ids(medium) <= ids_of(by_model)
        assert {row["model"] for row in by_model} == {"sim-medium"}
        assert ids_of(await audit_rows(admin, model="sim-medium", api_key_id=key)) == request_ids(medium)

        after = await audit_rows(admin, api_key_id=key, since=boundary.isoformat())
        assert ids_of(after) == request_ids(medium)
        before = await audit_rows(admin, api_key_id=key, until=boundary.isoformat())
        assert ids_of(before) == request_ids([*small, *invalid])
        # The same instant written two hours east, or naive (read as UTC), selects the same rows.
        east = boundary.astimezone(timezone(timedelta(hours=2))).isoformat()
        naive = boundary.replace(tzinfo=None).isoformat()
        assert ids_of(await audit_rows(admin, api_key_id=key, since=east)) == ids_of(after)
        assert ids_of(await audit_rows(admin, api_key_id=key, since=naive)) == ids_of(after)
        window = await audit_rows(
            admin, api_key_id=key, since=(boundary - timedelta(hours=1)).isoformat(), until=boundary.isoformat()
        )
        assert ids_of(window) == ids_of(before)


async def test_usage_gives_the_callers_own_totals_by_day_and_model(audited: Audited) -> None:
    first_day = datetime.now(UTC).date()
    async with audited.client("usage") as http, audited.client("other") as other, audited.client("admin") as admin:
        small = await run_tasks(http, 4)
        medium = await run_tasks(http, 3, model="sim-medium")
        others = await run_tasks(other, 5)
        await wait_for_rows(admin, request_ids([*small, *medium]), api_key_id=audited.ids["usage"])
        await wait_for_rows(admin, request_ids(others), api_key_id=audited.ids["other"])
        report = (await http.get("/v1/usage")).json()
        other_report = (await other.get("/v1/usage")).json()
    last_day = datetime.now(UTC).date()

    assert {date.fromisoformat(row["day"]) for row in report["data"]} <= {first_day, last_day}
    # Summed over days, in case the test ran across midnight UTC.
    assert per_model(report, "sim-small") == expected_usage("sim-small", small)
    assert per_model(report, "sim-medium") == expected_usage("sim-medium", medium)
    # The only other rows are this key's own usage reads, which use no model.
    assert {row["model"] for row in report["data"]} <= {"sim-small", "sim-medium", None}
    assert report["totals"] == {
        "requests": sum(row["requests"] for row in report["data"]),
        "prompt_tokens": sum(row["prompt_tokens"] for row in report["data"]),
        "completion_tokens": sum(row["completion_tokens"] for row in report["data"]),
        "cost_usd": f"{sum(Decimal(row['cost_usd']) for row in report['data']):.9f}",
    }
    assert {row["model"] for row in other_report["data"]} == {"sim-small"}  # none of the usage key's traffic
    assert per_model(other_report, "sim-small") == expected_usage("sim-small", others)


async def test_usage_keeps_to_the_days_asked_for(audited: Audited) -> None:
    today = datetime.now(UTC).date()
    async with audited.client("member") as http:
        later = (await http.get("/v1/usage", params={"since": str(today + timedelta(days=1))})).json()
        earlier = (await http.get("/v1/usage", params={"until": str(today - timedelta(days=1))})).json()
        backwards = await http.get("/v1/usage", params={"since": str(today), "until": str(today - timedelta(days=1))})
    empty = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": "0.000000000"}
    assert later == earlier == {"data": [], "totals": empty}
    assert backwards.status_code == 422 and backwards.json()["code"] == "invalid_request"


def per_model(report: dict[str, Any], model: str) -> dict[str, Any]:
    rows = [row for row in report["data"] if row["model"] == model]
    return {
        "requests": sum(row["requests"] for row in rows),
        "prompt_tokens": sum(row["prompt_tokens"] for row in rows),
        "completion_tokens": sum(row["completion_tokens"] for row in rows),
        "cost_usd": f"{sum((Decimal(row['cost_usd']) for row in rows), Decimal(0)):.9f}",
    }


def expected_usage(model: str, responses: list[httpx.Response]) -> dict[str, Any]:
    """What the task responses themselves reported, priced exactly."""
    prompt = sum(response.json()["usage"]["prompt_tokens"] for response in responses)
    completion = sum(response.json()["usage"]["completion_tokens"] for response in responses)
    prompt_price, completion_price = PRICES[model]
    return {
        "requests": len(responses),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": f"{(prompt_price * prompt + completion_price * completion) / 1_000_000:.9f}",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "not a cursor!"},
        {"cursor": cursor_of("id:abc")},
        {"cursor": cursor_of("id:0")},
        {"cursor": cursor_of("id:" + "9" * 5000)},
        {"cursor": cursor_of("42")},
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"status": "done"},
        {"api_key_id": 2**40},
        {"since": "yesterday"},
    ],
)
async def test_a_bad_cursor_limit_or_filter_is_a_422_problem(audited: Audited, params: dict[str, Any]) -> None:
    async with audited.client("admin") as admin:
        response = await admin.get("/v1/audit", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "invalid_request"
    assert [error["loc"] for error in response.json()["errors"]] == [["query", next(iter(params))]]
