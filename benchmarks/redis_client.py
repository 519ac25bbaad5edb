"""What one limiter script costs the client: redis-py, Pacemaker's own script client, and a bare RESP exchange.

Usage (--help for every option):

    .venv/bin/python -m benchmarks.redis_client [--url redis://127.0.0.1:6379/0] [--commands 20000] [--smoke]

Every request on the Redis limits runs two Lua scripts (admit, settle: app/enforcement/redis_limiter.py).
This runs the limiter's own admit (`RedisLimiter.admit` on a key prefix of its own, limits high enough
that every call is admitted) at concurrency 64 and 1 on a client from `build_redis` (redis-py's asyncio
client, its blocking pool, retry and timeouts, which the limiter used before), on the limiter's own
script client (`limiter_scripts`, app/enforcement/redis_wire.py, what the lifespan builds now), and
the same EVALSHA, with the keys and arguments the limiter sent, through the least a Python client
can do: one asyncio protocol per connection, the command packed and the reply parsed by the script client's own codec, a
timer per command for its timeout. It prints this process's CPU per call (the server's is not
counted) and calls/s. The bare client is not a client to use (no reconnect, no failure policy): it measures what
the floor is.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
import uuid
from collections import deque
from decimal import Decimal
from typing import Any, cast

from app.enforcement.limits import LimitSpec
from app.enforcement.redis_limiter import ADMIT_LUA, RedisLimiter, build_redis, limiter_scripts
from app.enforcement.redis_wire import pack, parse
from benchmarks.harness import fmt, log, new_loop

CONCURRENCY = (64, 1)


class _Bare(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.waiting:
            value, end = parse(self.buffer, 0)
            if end < 0:
                return
            self.buffer = self.buffer[end:]
            self.waiting.popleft().set_result(value)

    async def call(self, command: bytes, timeout_s: float) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(future)
        assert self.transport is not None
        self.transport.write(command)
        timer = loop.call_later(timeout_s, lambda: future.done() or future.set_exception(TimeoutError()))
        try:
            return await future
        finally:
            timer.cancel()


async def _measure(run: Any, commands: int, concurrency: int) -> tuple[float, float]:
    async def worker(count: int) -> None:
        for _ in range(count):
            await run()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(commands // concurrency) for _ in range(concurrency)))
    done = commands // concurrency * concurrency
    return (time.process_time() - cpu) / done * 1e6, done / (time.perf_counter() - wall)


SPEC = LimitSpec(rpm=10**9, tpm=10**12)
COST = Decimal("0.0001")


async def _limiter(
    url: str, prefix: str, commands: int, concurrency: int, *, own_client: bool
) -> tuple[float, float, list[bytes]]:
    """The limiter's admit through redis-py or its own script client, and the EVALSHA's keys and
    arguments as it sent them."""
    redis = build_redis(url)
    try:
        limiter = RedisLimiter(redis, prefix=prefix, scripts=limiter_scripts(url) if own_client else None)
        sent: list[bytes] = []
        real = limiter._admit

        async def recording(keys: Any, args: Any) -> Any:
            sent[:] = [str(len(keys)).encode(), *(str(part).encode() for part in (*keys, *args))]
            return await real(keys=keys, args=args)

        limiter._admit = recording  # type: ignore[assignment]
        await limiter.admit(1, SPEC, tokens=100, cost_usd=COST)  # loads the script, and says what it sends
        limiter._admit = real
        cpu, rate = await _measure(lambda: limiter.admit(1, SPEC, tokens=100, cost_usd=COST), commands, concurrency)
        await redis.delete(*limiter.keys_for(1))
        await limiter.aclose()
        return cpu, rate, sent
    finally:
        await redis.aclose()


async def _bare(url: str, sent: list[bytes], commands: int, concurrency: int) -> tuple[float, float]:
    host, _, rest = url.removeprefix("redis://").partition(":")
    port = int(rest.partition("/")[0] or 6379)
    loop = asyncio.get_running_loop()
    connections: list[_Bare] = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(_Bare, host, port)
        connections.append(protocol)
    try:
        sha = hashlib.sha1(ADMIT_LUA.encode()).hexdigest().encode()  # noqa: S324 (Redis names scripts so)
        command = pack([b"EVALSHA", sha, *sent])
        await connections[0].call(pack([b"SCRIPT", b"LOAD", ADMIT_LUA.encode()]), 1.0)
        free = list(connections)

        async def one() -> None:
            connection = free.pop()
            try:
                await connection.call(command, 0.25)
            finally:
                free.append(connection)

        return await _measure(one, commands, concurrency)
    finally:
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()


async def _main(args: argparse.Namespace) -> int:
    prefix = f"pacemaker:bench:redis-client:{uuid.uuid4().hex}"
    rows = []
    for concurrency in CONCURRENCY:
        commands = args.commands if concurrency > 1 else max(args.commands // 4, 1)
        log(f"{commands} EVALSHA at concurrency {concurrency} ...")
        py_cpu, py_rate, sent = await _limiter(args.url, prefix, commands, concurrency, own_client=False)
        own_cpu, own_rate, _ = await _limiter(args.url, prefix, commands, concurrency, own_client=True)
        bare_cpu, bare_rate = await _bare(args.url, sent, commands, concurrency)
        rows.append((concurrency, py_cpu, py_rate, own_cpu, own_rate, bare_cpu, bare_rate))
    redis = build_redis(args.url)
    try:
        await redis.delete(*RedisLimiter(redis, prefix=prefix).keys_for(1))
    finally:
        await redis.aclose()
    print(f"### One limiter script (admit, EVALSHA) from the client's side, {sys.implementation.name} on uvloop\n")
    print(
        "| concurrency | redis-py CPU us/admit | redis-py admits/s | own client CPU us/admit | own client admits/s"
        " | bare EVALSHA CPU us | bare EVALSHA/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency, py_cpu, py_rate, own_cpu, own_rate, bare_cpu, bare_rate in rows:
        print(
            f"| {concurrency} | {fmt(py_cpu, 1)} | {fmt(py_rate, 0)} | {fmt(own_cpu, 1)} | {fmt(own_rate, 0)}"
            f" | {fmt(bare_cpu, 1)} | {fmt(bare_rate, 0)} |"
        )
    print(
        "\nCPU is this process's only (redis-server's is not counted). An admit is the limiter's whole call"
        " (its arguments and its reply's parsing too); the bare EVALSHA is the exchange alone. Two scripts"
        " run per request."
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the Redis to use (a key of its own)")
    parser.add_argument("--commands", type=int, default=20_000, help="commands per client at concurrency 64")
    parser.add_argument("--smoke", action="store_true", help="seconds: a few hundred commands")
    args = parser.parse_args()
    if args.smoke:
        args.commands = 640
    loop = new_loop()
    try:
        return loop.run_until_complete(_main(args))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
