"""The thinnest reasonable Python pass-through for POST /v1/chat/completions: the benchmark's ceiling.

    python -m benchmarks.bare_proxy --port 9200 --upstream http://127.0.0.1:9100/v1

One FastAPI route on one shared aiohttp.ClientSession: the body is parsed once with orjson (as any
gateway must, to read `model` and `stream`), forwarded, and the answer relayed: JSON whole, SSE
chunk by chunk as it arrives. No auth, limits, metrics or validation: everything Pacemaker does
beyond this is what the benchmark measures. Served by uvicorn with uvloop and httptools, access
log off, one worker.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

_JSON = {"Content-Type": "application/json"}


def create_app(upstream_base_url: str, max_connections: int = 4096) -> FastAPI:
    url = upstream_base_url.rstrip("/") + "/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=120)
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Sized like Pacemaker's pool, so that both proxies get the same transport.
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=30)
        state["session"] = aiohttp.ClientSession(connector=connector, trust_env=False)
        try:
            yield
        finally:
            await state["session"].close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = orjson.loads(await request.body())
        upstream = await state["session"].post(url, data=orjson.dumps(body), headers=_JSON, timeout=timeout)
        if not body.get("stream"):
            try:
                content = await upstream.read()
            finally:
                upstream.release()
            return Response(content, status_code=upstream.status, media_type="application/json")

        async def relay() -> AsyncIterator[bytes]:
            finished = False
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
                finished = True
            finally:
                if finished:
                    upstream.release()
                else:
                    upstream.close()

        return StreamingResponse(relay(), status_code=upstream.status, media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, ending in /v1")
    parser.add_argument("--max-connections", type=int, default=4096, help="the upstream pool's size (as Pacemaker's)")
    parser.add_argument("--backlog", type=int, default=2048, help="the listen backlog (default: uvicorn's 2048)")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.max_connections),
        backlog=args.backlog,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        workers=1,
    )


if __name__ == "__main__":
    main()
