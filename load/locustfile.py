"""Locust scenarios for Pacemaker: tasks as JSON and as SSE, chat completions plain and streamed.

    locust -f load/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    locust -f load/locustfile.py --host ... --headless -u 50 -r 10 -t 2m --tags stream

The API key comes from PACEMAKER_API_KEY (or --api-key). Each scenario is its own User class, with a
weight, and its tasks carry tags; pick scenarios by tag (--tags / --exclude-tags) or by naming user
classes on the command line. See load/README.md.

Streaming requests are timed from the request to the last byte of the stream (not to the response
headers, which is what locust measures for stream=True), and each one that succeeds also records its
time to first token as a request of type TTFT, so the statistics get a "TTFT" row per streaming route.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

from locust import HttpUser, between, events, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner
from requests import RequestException

log = logging.getLogger("pacemaker.load")

# Some hold arithmetic, which makes the simulated provider call the calculator tool (a second model call).
QUERIES = (
    "What is 17 * 23 + 4?",
    "Compute (1234 - 567) * 3 for me.",
    "Summarise why rate limits matter for an API gateway.",
    "Tell me about agents that use tools.",
    "Explain server-sent events in two sentences.",
    "What is 2 ** 10 - 24?",
)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--api-key",
        env_var="PACEMAKER_API_KEY",
        default="",
        is_secret=True,
        is_required=True,
        help="Pacemaker API key, sent as 'Authorization: Bearer <key>' (env PACEMAKER_API_KEY)",
    )
    parser.add_argument(
        "--pm-model",
        env_var="PACEMAKER_LOAD_MODEL",
        default="sim-small",
        help="model for /v1/chat/completions (env PACEMAKER_LOAD_MODEL)",
    )
    parser.add_argument(
        "--pm-max-tokens",
        type=int,
        env_var="PACEMAKER_LOAD_MAX_TOKENS",
        default=64,
        help="max_tokens per request (env PACEMAKER_LOAD_MAX_TOKENS)",
    )


@events.init.add_listener
def _require_key(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return  # used as a library, or a worker: the master has checked
    if options.headless and not options.api_key:
        log.error("no API key: set PACEMAKER_API_KEY (create one with `pacemaker keys create --name load`)")
        sys.exit(2)


@events.test_start.add_listener
def _drop_users_without_tasks(environment: Environment, **_kwargs: Any) -> None:
    # Locust has just applied --tags/--exclude-tags to every user class; a class left with no task
    # would still be spawned and fail with "No tasks defined". Keep only the classes that can run.
    runnable = [user_class for user_class in environment.user_classes if user_class.tasks]
    if runnable and len(runnable) < len(environment.user_classes):
        dropped = sorted(u.__name__ for u in environment.user_classes if u not in runnable)
        log.info("no task left after tag filtering, not spawning: %s", ", ".join(dropped))
        environment.user_classes[:] = runnable


def sse_lines(response: Any) -> Iterator[str]:
    """The lines of a streamed response, as they arrive (each HTTP chunk is handed over at once)."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if buffer:
        yield buffer.decode("utf-8")


def sse_events(response: Any) -> Iterator[tuple[str, str]]:
    """(event, data) for each Server-Sent Event; comment lines such as ': ping' are skipped."""
    event, data = "message", []
    for line in sse_lines(response):
        if not line:  # a blank line ends the event
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def http_failure(response: Any) -> str:
    """'HTTP <status> <code>' from a problem+json or OpenAI error body (their request ids would make
    every failure a row of its own in locust's error report), else the start of the body."""
    try:
        body = response.json()
        code = body.get("code") or body["error"]["code"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return f"HTTP {response.status_code} {code}"


class PacemakerUser(HttpUser):
    abstract = True
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.api_key: str = getattr(options, "api_key", "")
        self.model: str = getattr(options, "pm_model", "sim-small")
        self.max_tokens: int = getattr(options, "pm_max_tokens", 64)
        self.client.headers["Authorization"] = f"Bearer {self.api_key}"

    def query(self) -> str:
        return random.choice(QUERIES)

    def record_ttft(self, name: str, started: float, first_token: float | None) -> None:
        """Time to first token, as a TTFT statistics row named `name`, for a stream that succeeded
        (a failed one is counted once, on its request row); a stream without any token fails here."""
        if first_token is None:
            elapsed, error = (time.perf_counter() - started) * 1000, RuntimeError("no token received")
        else:
            elapsed, error = (first_token - started) * 1000, None
        self.environment.events.request.fire(
            request_type="TTFT",
            name=name,
            response_time=elapsed,
            response_length=0,
            exception=error,
            context={},
        )

    @staticmethod
    def finish_stream(response: Any, started: float, length: int) -> None:
        # Report the whole stream's duration and size for this request instead of the time to headers
        # (request_meta is what locust reports when the `with` block ends). Closing a stream that was
        # read to its end returns the connection to the pool; a broken one is dropped.
        response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        response.request_meta["response_length"] = length
        response.close()


class TaskJsonUser(PacemakerUser):
    """POST /v1/tasks and wait for the JSON result."""

    weight = 3

    @tag("tasks", "json")
    @task
    def task_json(self) -> None:
        body = {"query": self.query(), "max_tokens": self.max_tokens}
        with self.client.post("/v1/tasks", json=body, name="/v1/tasks [json]", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_failure(response))
                return
            try:
                result = response.json()
            except ValueError:
                response.failure("the answer is not JSON")
                return
            if result.get("status") != "completed" or not result.get("output"):
                response.failure(f"unexpected result: {str(result)[:300]}")


class TaskStreamUser(PacemakerUser):
    """POST /v1/tasks with "stream": true; reads the SSE stream to its end, which must be task.completed."""

    weight = 3

    @tag("tasks", "sse", "stream")
    @task
    def task_sse(self) -> None:
        name = "/v1/tasks [sse]"
        body = {"query": self.query(), "max_tokens": self.max_tokens, "stream": True}
        headers = {"Accept": "text/event-stream"}
        started = time.perf_counter()
        first_token: float | None = None
        with self.client.post(
            "/v1/tasks", json=body, headers=headers, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(http_failure(response))
                return
            last_type, failure, length = None, None, 0
            try:
                for event, data in sse_events(response):
                    length += len(data)
                    last_type = event
                    if event == "token.delta" and first_token is None:
                        first_token = time.perf_counter()
                    elif event == "task.failed":
                        failure = json.loads(data)
            except (RequestException, ValueError) as exc:
                response.failure(f"the stream broke: {exc!r}")
                return
            finally:
                self.finish_stream(response, started, length)
            if failure is not None:
                response.failure(f"task.failed: {failure.get('code')}: {failure.get('detail')}")
                return
            if last_type != "task.completed":
                response.failure(f"the stream ended without task.completed (last event: {last_type})")
                return
        self.record_ttft(name, started, first_token)


class ChatUser(PacemakerUser):
    """POST /v1/chat/completions, plain and streamed (OpenAI's chunk format, ended by [DONE])."""

    weight = 2

    def chat_body(self, stream: bool) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": self.query()}],
            "max_tokens": self.max_tokens,
            "stream": stream,
        }

    @tag("chat", "json")
    @task
    def chat(self) -> None:
        name = "/v1/chat/completions [json]"
        body = self.chat_body(stream=False)
        with self.client.post("/v1/chat/completions", json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_failure(response))
                return
            try:
                choice = response.json()["choices"][0]
            except (ValueError, KeyError, IndexError):
                response.failure(f"not a chat completion: {response.text[:300]}")
                return
            if not choice.get("message", {}).get("content") or not choice.get("finish_reason"):
                response.failure(f"empty completion: {choice}")

    @tag("chat", "stream")
    @task
    def chat_stream(self) -> None:
        name = "/v1/chat/completions [stream]"
        body = {**self.chat_body(stream=True), "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first_token: float | None = None
        with self.client.post(
            "/v1/chat/completions", json=body, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(http_failure(response))
                return
            done, error, length = False, None, 0
            try:
                for line in sse_lines(response):
                    if not line.startswith("data:"):
                        continue  # blank separators and ': ping' comments
                    data = line.removeprefix("data:").strip()
                    length += len(data)
                    if done or error is not None:
                        continue  # read to the end, so that the connection can be reused
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = chunk["error"]
                        continue
                    choices = chunk.get("choices") or [{}]
                    if first_token is None and choices[0].get("delta", {}).get("content"):
                        first_token = time.perf_counter()
            except (RequestException, ValueError) as exc:
                response.failure(f"the stream broke: {exc!r}")
                return
            finally:
                self.finish_stream(response, started, length)
            if error is not None:
                response.failure(f"error in the stream: {error.get('code')}: {error.get('message')}")
                return
            if not done:
                response.failure("the stream ended without data: [DONE]")
                return
        self.record_ttft(name, started, first_token)
