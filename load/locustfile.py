"""Locust scenarios for Pacemaker: tasks as JSON, SSE and WebSocket, a task with a tool call, a
background task followed and resumed over /events, chat completions plain and streamed, and a
multi-key mix that shows per-key limits holding.

    locust -f load/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    locust -f load/locustfile.py --host ... --headless -u 50 -r 10 -t 2m --tags stream

The API key comes from PACEMAKER_API_KEY (or --api-key); the multi-key scenario also needs a second,
rate-limited key in PACEMAKER_LOAD_LIMITED_KEY. Each scenario is its own User class, with a weight,
and its tasks carry tags; pick scenarios by tag (--tags / --exclude-tags) or by naming user classes
on the command line. See load/README.md.

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
from typing import Any, ClassVar

from locust import HttpUser, between, events, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner
from requests import RequestException
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

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
TOOL_QUERIES = ("What is 17 * 23 + 4?", "Compute (1234 - 567) * 3 for me.", "What is 2 ** 10 - 24?")
PLAIN_QUERIES = tuple(query for query in QUERIES if query not in TOOL_QUERIES)
# The refusals a key's own limits give: expected on the limited key, a failure on the load key.
LIMIT_CODES = ("rate_limit_exceeded", "concurrency_limit_exceeded")
# A task that has not ended by then is reported as failed, and its socket dropped.
TASK_TIMEOUT_S = 60.0


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
    parser.add_argument(
        "--pm-ws-tasks",
        type=int,
        env_var="PACEMAKER_LOAD_WS_TASKS",
        default=4,
        help="tasks sent at once on each WebSocket (env PACEMAKER_LOAD_WS_TASKS)",
    )
    parser.add_argument(
        "--pm-limited-key",
        env_var="PACEMAKER_LOAD_LIMITED_KEY",
        default="",
        is_secret=True,
        help="the multi-key scenario's rate-limited key (env PACEMAKER_LOAD_LIMITED_KEY)",
    )
    parser.add_argument(
        "--pm-limited-rpm",
        type=int,
        env_var="PACEMAKER_LOAD_LIMITED_RPM",
        default=60,
        help="the limited key's --rpm, to check that it holds (env PACEMAKER_LOAD_LIMITED_RPM)",
    )
    parser.add_argument(
        "--pm-limited-burst",
        type=int,
        env_var="PACEMAKER_LOAD_LIMITED_BURST",
        default=5,
        help="the limited key's --burst (env PACEMAKER_LOAD_LIMITED_BURST)",
    )


@events.init.add_listener
def _require_key(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return  # used as a library, or a worker: the master has checked
    if options.headless and not options.api_key:
        log.error("no API key: set PACEMAKER_API_KEY (create one as load/README.md shows)")
        sys.exit(2)


@events.test_start.add_listener
def _drop_users_that_cannot_run(environment: Environment, **_kwargs: Any) -> None:
    # Locust has just applied --tags/--exclude-tags to every user class; a class left with no task
    # would still be spawned and fail with "No tasks defined". Keep only the classes that can run.
    # The multi-key scenario cannot run without its second key either.
    options = environment.parsed_options
    limited_key = getattr(options, "pm_limited_key", "") if options is not None else ""
    runnable = [
        user_class
        for user_class in environment.user_classes
        if user_class.tasks and (limited_key or not issubclass(user_class, MultiKeyUser))
    ]
    if runnable and len(runnable) < len(environment.user_classes):
        dropped = sorted(u.__name__ for u in environment.user_classes if u not in runnable)
        log.warning("not spawning %s (no task left after tag filtering, or no PACEMAKER_LOAD_LIMITED_KEY)", dropped)
        environment.user_classes[:] = runnable
    elif not runnable:
        log.error("no scenario can run: MultiKeyUser needs PACEMAKER_LOAD_LIMITED_KEY (see load/README.md)")
        sys.exit(2)


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


def problem_code(response: Any) -> str | None:
    """The stable `code` of a problem+json or OpenAI error body, if it has one."""
    try:
        body = response.json()
        code = body.get("code") or body["error"]["code"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return str(code)


def http_failure(response: Any) -> str:
    """'HTTP <status> <code>' from a problem+json or OpenAI error body (their request ids would make
    every failure a row of its own in locust's error report), else the start of the body."""
    code = problem_code(response)
    if code is None:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return f"HTTP {response.status_code} {code}"


_hinted = False


def _hint_limits(response: Any) -> None:
    """Say once why the load key is refused, when its own limits are what refuses it."""
    global _hinted
    if not _hinted and response.status_code == 429 and problem_code(response) in LIMIT_CODES:
        _hinted = True
        log.warning(
            "the load key's own limits refuse this load (%s): a key gets limits.* by default (10 requests"
            " in flight, 600 a minute); create the load key as load/README.md shows",
            problem_code(response),
        )


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

    def fail(self, response: Any) -> None:
        _hint_limits(response)
        response.failure(http_failure(response))

    def fire(self, request_type: str, name: str, started: float, length: int, error: str | None) -> None:
        """A request row for what is not an HTTP request of locust's client (a WebSocket task)."""
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=RuntimeError(error) if error is not None else None,
            context={},
        )

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
        # read to its end returns the connection to the pool; a broken or abandoned one is dropped.
        response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        response.request_meta["response_length"] = length
        response.close()

    def stream_task(self, name: str, body: dict[str, Any], key: str | None = None) -> bool:
        """POST /v1/tasks as SSE, read to its end, which must be task.completed (and, when the body
        names tools, hold a tool call and its result). Records the request row and the TTFT row;
        True when the task completed."""
        headers = {"Accept": "text/event-stream"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        started = time.perf_counter()
        first_token: float | None = None
        with self.client.post(
            "/v1/tasks", json={**body, "stream": True}, headers=headers, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                self.fail(response)
                return False
            seen: list[str] = []
            last_type, failure, tool_error, length = None, None, None, 0
            try:
                for event, data in sse_events(response):
                    length += len(data)
                    last_type = event
                    seen.append(event)
                    if event == "token.delta" and first_token is None:
                        first_token = time.perf_counter()
                    elif event == "task.failed":
                        failure = json.loads(data)
                    elif event == "tool.result" and json.loads(data).get("error"):
                        tool_error = json.loads(data)["error"]
            except (RequestException, ValueError) as exc:
                response.failure(f"the stream broke: {exc!r}")
                return False
            finally:
                self.finish_stream(response, started, length)
            if failure is not None:
                response.failure(f"task.failed: {failure.get('code')}: {failure.get('detail')}")
                return False
            if last_type != "task.completed":
                response.failure(f"the stream ended without task.completed (last event: {last_type})")
                return False
            if body.get("tools") and ("tool.call" not in seen or "tool.result" not in seen or tool_error):
                response.failure(f"no successful tool call (events: {sorted(set(seen))}, error: {tool_error})")
                return False
        self.record_ttft(name, started, first_token)
        return True


class TaskJsonUser(PacemakerUser):
    """POST /v1/tasks and wait for the JSON result."""

    weight = 3

    @tag("tasks", "json")
    @task
    def task_json(self) -> None:
        body = {"query": self.query(), "max_tokens": self.max_tokens}
        with self.client.post("/v1/tasks", json=body, name="/v1/tasks [json]", catch_response=True) as response:
            if response.status_code != 200:
                self.fail(response)
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
        self.stream_task("/v1/tasks [sse]", {"query": self.query(), "max_tokens": self.max_tokens})


class ToolTaskUser(PacemakerUser):
    """A streamed task whose query makes the model call the calculator: a model call, the tool call,
    a second model call. Fails unless the stream holds tool.call and a tool.result without error."""

    weight = 1

    @tag("tasks", "tools", "stream")
    @task
    def task_tool(self) -> None:
        body = {"query": random.choice(TOOL_QUERIES), "max_tokens": self.max_tokens, "tools": ["calculator"]}
        self.stream_task("/v1/tasks [tool call]", body)


class WebSocketUser(PacemakerUser):
    """WS /v1/ws: each round opens a socket, sends --pm-ws-tasks tasks at once on it, reads their
    interleaved events (told apart by `ref`) until every one has ended, and closes it. Each task is
    a row of type WS, timed from its task.create to its task.completed, plus its TTFT row."""

    weight = 2
    name = "/v1/ws [task]"

    def on_start(self) -> None:
        super().on_start()
        self.tasks_per_round: int = max(1, getattr(self.environment.parsed_options, "pm_ws_tasks", 4))
        self.round = 0

    @tag("ws", "tasks", "stream")
    @task
    def ws_tasks(self) -> None:
        url = "ws" + self.host.removeprefix("http") + "/v1/ws"  # http -> ws, https -> wss
        self.round += 1
        # ref -> [started, first token, bytes received]
        pending: dict[str, list[Any]] = {}
        started = time.perf_counter()
        connected = False
        try:
            # No keepalive pings: a round is short, and their thread (a greenlet under Locust) would
            # outlive a user stopped mid-round.
            with connect(
                url, additional_headers={"Authorization": f"Bearer {self.api_key}"}, open_timeout=10, ping_interval=None
            ) as socket:
                connected = True
                self.fire("WS", "/v1/ws [connect]", started, 0, None)
                self.run_round(socket, pending)
        except (OSError, WebSocketException, ValueError) as exc:
            if not connected:
                self.fire("WS", "/v1/ws [connect]", started, 0, f"the handshake failed: {exc!r}")
            # What was still pending fails, each once.
            reason = f"no final event within {TASK_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else repr(exc)
            for state in pending.values():
                self.fire("WS", self.name, state[0], state[2], reason)

    def run_round(self, socket: ClientConnection, pending: dict[str, list[Any]]) -> None:
        for n in range(self.tasks_per_round):
            ref = f"{self.round}.{n}"
            pending[ref] = [time.perf_counter(), None, 0]
            message = {"type": "task.create", "ref": ref, "query": self.query(), "max_tokens": self.max_tokens}
            socket.send(json.dumps(message))
        deadline = time.monotonic() + TASK_TIMEOUT_S
        while pending:
            message = json.loads(socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            state = pending.get(message.get("ref"))
            if state is None:
                continue
            state[2] += len(json.dumps(message))
            kind = message.get("type")
            if kind == "token.delta" and state[1] is None:
                state[1] = time.perf_counter()
            elif kind in ("task.completed", "task.failed", "error"):
                del pending[message["ref"]]
                error = None if kind == "task.completed" else f"{kind}: {message.get('code')}"
                self.fire("WS", self.name, state[0], state[2], error)
                if error is None:
                    self.record_ttft(self.name, state[0], state[1])


class BackgroundUser(PacemakerUser):
    """POST /v1/tasks with "background": true (202), follow its events over GET /v1/tasks/{id}/events,
    drop the connection after the first token as a client losing its network would, and resume
    with Last-Event-ID. Fails unless the events of both reads, together, are every seq from 1 exactly
    once, in order, ending with task.completed. TTFT is from the POST to the first token read."""

    weight = 1

    @tag("background", "tasks", "stream")
    @task
    def background(self) -> None:
        started = time.perf_counter()
        body = {"query": self.query(), "max_tokens": self.max_tokens, "background": True}
        with self.client.post("/v1/tasks", json=body, name="/v1/tasks [background]", catch_response=True) as response:
            if response.status_code != 202:
                self.fail(response)
                return
            try:
                task_id = response.json()["id"]
            except (ValueError, KeyError, TypeError):
                response.failure(f"no task id in the answer: {response.text[:300]}")
                return
        seqs: list[int] = []
        last: list[str | None] = [None]
        first_token = self.follow(task_id, seqs, last, None, started)
        if first_token is None and last[0] is None:
            return  # the first read failed, and says so
        if last[0] not in ("task.completed", "task.failed"):
            self.follow(task_id, seqs, last, seqs[-1] if seqs else 0, started)
        if seqs != list(range(1, len(seqs) + 1)) or last[0] != "task.completed":
            self.fire("EVENTS", "/v1/tasks/{id}/events [check]", started, 0, f"seqs {seqs}, last event {last[0]}")
            return
        self.fire("EVENTS", "/v1/tasks/{id}/events [check]", started, 0, None)
        self.record_ttft("/v1/tasks [background]", started, first_token)

    def follow(self, task_id: str, seqs: list[int], last: list[str | None], after: int | None, started: float) -> Any:
        """Read the task's events into seqs; the first read (after None) stops at the first token.
        Returns when the first token was read (first read only)."""
        name = "/v1/tasks/{id}/events" if after is None else "/v1/tasks/{id}/events [resume]"
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        first_token = None
        begun = time.perf_counter()
        with self.client.get(
            f"/v1/tasks/{task_id}/events", headers=headers, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                self.fail(response)
                return None
            length = 0
            try:
                for event, data in sse_events(response):
                    length += len(data)
                    seqs.append(json.loads(data)["seq"])
                    last[0] = event
                    if event == "token.delta" and after is None:
                        first_token = time.perf_counter()
                        break  # gone mid-stream: the rest comes on the resume
            except (RequestException, ValueError, KeyError) as exc:
                response.failure(f"the stream broke: {exc!r}")
                return None
            finally:
                self.finish_stream(response, begun, length)
        return first_token


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
                self.fail(response)
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
                self.fail(response)
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


class MultiKeyUser(PacemakerUser):
    """Two keys at once: a streamed task on the load key, then several on the limited key
    (PACEMAKER_LOAD_LIMITED_KEY, made with a small --rpm and --burst), more than its limit allows.

    Shows per-key limits holding: the limited key's 429s (rate or concurrency) are the expected
    answer and are counted on a row of their own, not as failures; it fails when the load key is
    refused for its limits (one key's traffic must not cost another's), or when the limited key is
    admitted more often than its token bucket can allow (--pm-limited-burst, then --pm-limited-rpm
    a minute) since this process first sent it a request. Several Pacemaker instances without
    Redis each enforce their own copy of the limit, which this check reports."""

    weight = 1
    LIMITED_PER_ROUND = 3
    # Shared by this process's users of this class: the limited key's one token bucket.
    limited_first_sent: ClassVar[float | None] = None
    limited_admitted: ClassVar[int] = 0

    def on_start(self) -> None:
        super().on_start()
        options = self.environment.parsed_options
        self.limited_key: str = getattr(options, "pm_limited_key", "")
        self.limited_rpm: int = getattr(options, "pm_limited_rpm", 60)
        self.limited_burst: int = getattr(options, "pm_limited_burst", 5)

    @tag("keys", "limits", "stream")
    @task
    def mix(self) -> None:
        body = {"query": self.query(), "max_tokens": self.max_tokens}
        self.stream_task("/v1/tasks [key: load]", body)
        for _ in range(self.LIMITED_PER_ROUND):
            self.limited_task()

    def limited_task(self) -> None:
        name = "/v1/tasks [key: limited]"
        now = time.perf_counter()
        if MultiKeyUser.limited_first_sent is None:
            MultiKeyUser.limited_first_sent = now
        headers = {"Authorization": f"Bearer {self.limited_key}"}
        # Plain queries only: measured here, a task with a tool call (a second model call) leaves the
        # in-process limiter's request bucket refilled, so --rpm does not hold for such tasks.
        body = {"query": random.choice(PLAIN_QUERIES), "max_tokens": self.max_tokens}
        with self.client.post("/v1/tasks", json=body, headers=headers, name=name, catch_response=True) as response:
            if response.status_code == 429 and problem_code(response) in LIMIT_CODES:
                response.request_meta["name"] = "/v1/tasks [key: limited, refused]"
                response.success()
                return
            if response.status_code != 200:
                response.failure(http_failure(response))
                return
            MultiKeyUser.limited_admitted += 1
            elapsed = time.perf_counter() - MultiKeyUser.limited_first_sent
            allowed = self.limited_burst + self.limited_rpm * elapsed / 60 + 1  # + 1: the bucket's rounding
            if MultiKeyUser.limited_admitted > allowed:
                response.failure(
                    f"the limited key's limit does not hold: {MultiKeyUser.limited_admitted} admitted in"
                    f" {elapsed:.1f} s, its burst {self.limited_burst} and rpm {self.limited_rpm} allow {allowed:.0f}"
                )
