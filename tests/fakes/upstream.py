"""A fake OpenAI-compatible upstream, run as a real HTTP server process by the tests and benchmarks.

    python -m tests.fakes.upstream --port 9100

It speaks POST /v1/chat/completions (JSON and SSE with a final usage chunk), answers tool calls the
way a model would, and injects faults on request. Directives go in the last user message, so they
travel through Pacemaker untouched:

    #status=500        answer with that HTTP status (429 carries Retry-After: 1)
    #fail=N            fail (500) for the first N requests that carry the same #tag
    #latency=0.5       wait before answering (seconds)
    #delay=0.05        wait between streamed chunks (seconds)
    #first=1           with #delay: the role chunk at once, the first token after this, the rest #delay apart
    #tokens=N          answer with N tokens
    #malformed         a malformed chunk after the first token (stream)
    #drop=N            drop the connection after N chunks (stream)
    #nousage           report no usage
    #tag=abc           name the request in /_control/stats
    #tool=NAME         call that tool (when offered), #calls=N times in one turn, arguments {"call": i}
    #profile=NAME      a named set of the above, for held streams (its own directives override it):
                       held-slow: 20 tokens at 1 event/s, the first after 1 s (20 s per stream);
                       held-fast: 50 tokens at 10 events/s, the first after 0.1 s (5 s per stream)

A message containing an arithmetic expression, with a `calculator` tool offered, gets a tool call;
a message list ending in a tool result gets an answer quoting it. Its own bookkeeping (requests,
tokens served, disconnects seen, streams open now and at most at once) is at GET /_control/stats
and is reset by POST /_control/reset.
Prompt tokens are counted with Pacemaker's own estimator, and a stream's completion tokens as its
chunks are sent, so a stream cut short counts what it really served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import Counter
from typing import Any

from aiohttp import web

from app.providers.tokens import count_message_tokens

ARITHMETIC = re.compile(r"\(*\s*-?\d+(?:\.\d+)?\s*\)*(?:\s*[-+*/]\s*\(*\s*-?\d+(?:\.\d+)?\s*\)*)+")
DIRECTIVE = re.compile(r"#(\w+)(?:=([\w.\-]+))?")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
PROFILES = {
    "held-slow": {"first": "1", "delay": "1", "tokens": "20"},
    "held-fast": {"first": "0.1", "delay": "0.1", "tokens": "50"},
}


class FakeUpstream:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.active = 0  # streams open now
        self.peak_active = 0  # the most streams open at once
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnects: list[dict[str, Any]] = []
        self.by_tag: Counter[str] = Counter()
        self.last_bodies: list[dict[str, Any]] = []
        # The trace headers of the last requests, as they came (None: not sent).
        self.last_trace_headers: list[dict[str, str | None]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        self.last_bodies = [*self.last_bodies[-19:], body]
        trace_headers = {name: request.headers.get(name) for name in ("traceparent", "x-request-id")}
        self.last_trace_headers = [*self.last_trace_headers[-19:], trace_headers]
        messages = body.get("messages") or []
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        directives = dict(DIRECTIVE.findall(_text(last_user)))
        directives = {**PROFILES.get(directives.get("profile", ""), {}), **directives}
        tag = directives.get("tag", "")
        self.by_tag[tag] += 1

        if "latency" in directives:
            await asyncio.sleep(float(directives["latency"]))
        status = _failure_status(directives, self.by_tag[tag])
        if status is not None:
            headers = {"Retry-After": "1"} if status == 429 else {}
            return web.json_response(
                {"error": {"message": f"injected {status}", "type": "fake", "code": str(status)}},
                status=status,
                headers=headers,
            )

        model = body.get("model", "fake")
        # Counted the way Pacemaker estimates, so that the tokens of a call cut short (which
        # Pacemaker can only estimate) still add up exactly against what this upstream served.
        prompt_tokens = count_message_tokens(messages)
        tool_calls = _tool_calls(messages, body.get("tools") or [], directives)
        pieces = [] if tool_calls else _answer(messages, int(directives.get("tokens", 12)))
        completion_tokens = len(pieces) if not tool_calls else 10 * len(tool_calls)
        report_usage = "nousage" not in directives
        self.prompt_tokens += prompt_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        finish = "tool_calls" if tool_calls else "stop"

        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces) or None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }
            if report_usage:
                payload["usage"] = usage
            self.completion_tokens += completion_tokens
            return web.json_response(payload)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        sent = 0
        delay = float(directives.get("delay", 0))
        first = float(directives["first"]) if "first" in directives else None
        try:
            await response.prepare(request)
            await response.write(b": stream open\n\n")  # headers go out now, as a real upstream's do
            deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
            deltas += [{"tool_calls": [{**call, "index": index}]} for index, call in enumerate(tool_calls)]
            deltas += [{"content": piece} for piece in pieces]
            for n, delta in enumerate(deltas):
                wait = delay if first is None else 0.0 if n == 0 else first if n == 1 else delay
                if wait:
                    await asyncio.sleep(wait)
                if "drop" in directives and sent >= int(directives["drop"]):
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(_sse(_chunk(model, delta, None)))
                sent += 1
                # Completion tokens are served as they are sent: a stream cut short served fewer.
                self.completion_tokens += 10 if "tool_calls" in delta else 1 if delta.get("content") else 0
                if "malformed" in directives and sent == 2:
                    await response.write(b'data: {"choices": [{"delta": {"content": 7\n\n')
            await response.write(_sse(_chunk(model, {}, finish)))
            if report_usage and (body.get("stream_options") or {}).get("include_usage"):
                await response.write(_sse({**_chunk(model, {}, None), "choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects.append({"tag": tag, "at": time.time(), "chunks_sent": sent})
            raise
        finally:
            self.active -= 1
        return response

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": self.requests,
                "active": self.active,
                "peak_active": self.peak_active,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "disconnects": self.disconnects,
                "by_tag": dict(self.by_tag),
                "last_bodies": self.last_bodies,
                "last_trace_headers": self.last_trace_headers,
            }
        )

    async def reset_handler(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def _failure_status(directives: dict[str, str], attempt: int) -> int | None:
    if "status" in directives:
        return int(directives["status"])
    if "fail" in directives and attempt <= int(directives["fail"]):
        return 500
    return None


def _tool_calls(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], directives: dict[str, str]
) -> list[dict[str, Any]]:
    offered = {t.get("function", {}).get("name") for t in tools}
    if not messages or messages[-1].get("role") != "user":
        return []
    named = directives.get("tool")
    if named is not None and named in offered:
        # #tool=NAME #calls=N: N calls of that tool in one turn, with arguments {"call": i}.
        return [
            {
                "id": f"call_fake_{n}",
                "type": "function",
                "function": {"name": named, "arguments": json.dumps({"call": n})},
            }
            for n in range(int(directives.get("calls", 1)))
        ]
    call = _tool_call(messages, offered)
    return [call] if call is not None else []


def _tool_call(messages: list[dict[str, Any]], offered: set[Any]) -> dict[str, Any] | None:
    code = re.search(r"```python\n(.*?)```", _text(messages[-1]), re.DOTALL)
    if code is not None and "python" in offered:
        return {
            "id": "call_fake_py",
            "type": "function",
            "function": {"name": "python", "arguments": json.dumps({"code": code.group(1)})},
        }
    if "calculator" not in offered:
        return None
    match = ARITHMETIC.search(DIRECTIVE.sub("", _text(messages[-1])))
    if match is None:
        return None
    return {
        "id": "call_fake_1",
        "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": match.group(0).strip()})},
    }


def _answer(messages: list[dict[str, Any]], tokens: int) -> list[str]:
    if messages and messages[-1].get("role") == "tool":
        try:
            value = json.loads(messages[-1].get("content") or "null")
        except ValueError:
            value = messages[-1].get("content")
        if isinstance(value, dict) and "stdout" in value:
            return ["The", " output", " is", f" {str(value['stdout']).strip()}", "."]
        result = value.get("result", value) if isinstance(value, dict) else value
        return ["The", " answer", " is", f" {result}", "."]
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(tokens)]


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


async def tool_echo(request: web.Request) -> web.Response:
    """For HTTP tool tests: says back what it was sent."""
    body = await request.json() if request.can_read_body else None
    return web.json_response(
        {
            "method": request.method,
            "query": dict(request.query),
            "body": body,
            "authorization": request.headers.get("Authorization"),
            "traceparent": request.headers.get("traceparent"),
            "x_request_id": request.headers.get("x-request-id"),
        }
    )


async def tool_slow(request: web.Request) -> web.Response:
    """An HTTP tool that takes its time: `seconds` (default 1) before it answers."""
    await asyncio.sleep(float(request.query.get("seconds", "1")))
    return web.json_response({"slept": float(request.query.get("seconds", "1")), "query": dict(request.query)})


async def tool_redirect(request: web.Request) -> web.Response:
    """Redirects to the `to` query parameter (another origin, or a path of this one)."""
    raise web.HTTPFound(request.query["to"])


async def tool_many(_request: web.Request) -> web.Response:
    """A JSON answer far larger than one network read (it reaches a client in many chunks)."""
    return web.json_response({"items": [{"n": n, "name": f"item {n}"} for n in range(20_000)]})


async def tool_big(_request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 2_000_000)


async def tool_fail(_request: web.Request) -> web.Response:
    return web.Response(status=503, text="tool backend down")


def build_app() -> web.Application:
    fake = FakeUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_route("*", "/tools/echo", tool_echo)
    app.router.add_get("/tools/redirect", tool_redirect)
    app.router.add_get("/tools/slow", tool_slow)
    app.router.add_get("/tools/big", tool_big)
    app.router.add_get("/tools/many", tool_many)
    app.router.add_get("/tools/fail", tool_fail)
    app.router.add_get("/_control/stats", fake.stats)
    app.router.add_post("/_control/reset", fake.reset_handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=128, help="the listen backlog (default: aiohttp's 128)")
    args = parser.parse_args()
    # handler_cancellation: a handler learns at once that its client went away.
    web.run_app(
        build_app(),
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        handler_cancellation=True,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
