"""A client flood from its own process (the test's loop stays free): `concurrency` clients post
JSON tasks back to back for `seconds`, then print the count of each outcome as one JSON line.

    python -m tests.fakes.flood BASE_URL KEY --concurrency 128 --seconds 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import aiohttp


async def flood(base_url: str, key: str, concurrency: int, seconds: float) -> dict[str, int]:
    outcomes: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, headers=headers, connector=connector) as http:

        async def client() -> None:
            while time.monotonic() < deadline:
                try:
                    async with http.post("/v1/tasks", json={"query": "flood"}) as response:
                        body = await response.json(content_type=None)
                        code = body.get("code") if response.status >= 400 else None
                        retry_after = "retry-after" in response.headers
                        outcomes[f"{response.status} {code}" if code else str(response.status)] += 1
                        if code == "overloaded" and not retry_after:
                            outcomes["overloaded without retry-after"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return dict(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("key")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(flood(args.base_url, args.key, args.concurrency, args.seconds))))


if __name__ == "__main__":
    main()
