"""Background tasks: run detached from any connection, their events logged for followers on any instance.

A background task is admitted by the task service like any other; here it runs in a task of its
own, every event goes to the event log (memory or Redis Streams) as it is made, and followers read
the log from any seq, so a client can drop and resume without losing or repeating an event. A
follower on this instance reads the events of a task running here straight from memory
(app/tasks/live.py), never waiting on Redis. A task whose instance died is ended here too, by the
lease sweep (app/tasks/leases.py): a last event, a final record and an audit row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from app.agent.events import TaskFailed
from app.audit.context import AuditContext
from app.audit.sink import AuditSink
from app.auth.principal import Principal
from app.errors import AppError, EventsNotKept, ModelNotFound, WorkerLost
from app.observability.metrics import Metrics
from app.providers.base import Usage
from app.providers.registry import ProviderRegistry
from app.tasks.events import EventLog, EventReader, EventsGone, EventWriter, LoggedEvent, UnknownTask
from app.tasks.live import LiveEvents
from app.tasks.models import TaskRecord
from app.tasks.service import AdmittedTask, TaskService

log = logging.getLogger(__name__)

# How long start() waits for a new task's log to be visible to readers on other instances.
_VISIBLE_WITHIN_S = 2.0


class BackgroundTasks:
    def __init__(
        self,
        service: TaskService,
        events: EventLog,
        *,
        live: bool,
        providers: ProviderRegistry,
        audit: AuditSink | None,
        metrics: Metrics,
    ) -> None:
        self._service = service
        self.events = events
        self._keep_live = live  # the log is not in this process (Redis): keep running tasks' events here too
        self._providers = providers
        self._audit = audit
        self._metrics = metrics
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._live: dict[str, LiveEvents] = {}

    def running(self) -> list[str]:
        return list(self._runs)

    async def start(self, task: AdmittedTask) -> None:
        """Run an admitted background task; it goes on whatever happens to the connection that asked.

        Returns once the task's log exists for readers on every instance (bounded), so that the
        task id the client gets can be followed at once from anywhere.
        """
        if self._keep_live:
            self._live[task.id] = LiveEvents()
        # The writer now, not in the run: a follower may read the log before the run's first step.
        writer = self.events.writer(task.id)
        run = asyncio.create_task(self._run(task, writer), name=f"background-{task.id}")
        self._runs[task.id] = run
        run.add_done_callback(lambda _done: self._runs.pop(task.id, None))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.flush(), _VISIBLE_WITHIN_S)

    async def _run(self, task: AdmittedTask, writer: EventWriter) -> None:
        live = self._live.get(task.id)
        try:
            async with aclosing(self._service.run(task)) as events:
                async for event in events:
                    logged = LoggedEvent(event.seq, event.type, event.model_dump_json().encode())
                    writer.add(logged)
                    if live is not None:
                        live.add(logged)
        except Exception:
            log.exception("background task %s failed unexpectedly", task.id)
        finally:
            try:
                await writer.close()
                if getattr(writer, "dropped", 0) and task.last is not None:
                    # The log lost events to a long storage outage, maybe the final one: end it for
                    # its readers, who otherwise wait for an end that never comes.
                    await self._end_log(task)
            finally:
                if live is not None:
                    live.finish()
                    self._live.pop(task.id, None)

    async def _end_log(self, task: AdmittedTask) -> None:
        last = task.last
        assert last is not None
        try:
            await self.events.append_final(
                task.id, last.type, lambda seq: last.model_copy(update={"seq": seq}).model_dump_json().encode()
            )
        except Exception as exc:
            log.warning("task %s: could not end its event log (%s)", task.id, type(exc).__name__)

    async def follow(self, task_id: str, after: int) -> AsyncIterator[LoggedEvent]:
        """The task's events with seq > after, then the live ones, ending after its terminal event.

        Raises UnknownTask (nothing logged: a task that was never background, or whose events
        expired) or EventsGone before the first event, so that a route can still answer 404 or 410.
        """
        live = self._live.get(task_id)
        if live is not None:
            return live.follow(after)
        reader = self.events.read(task_id, after)
        await reader.start()
        return _iterate(reader)

    async def follow_for(self, principal: Principal, task_id: str, after: int) -> AsyncIterator[LoggedEvent]:
        """follow(), for a caller: TaskNotFound for another key's task, EventsNotKept for a task that is
        not a background one, EventsGone for events no longer kept (the record remains)."""
        record = await self._service.lookup(principal, task_id)
        if not record.background:
            raise EventsNotKept(f"Task {task_id} is not a background task; GET /v1/tasks/{task_id} has its outcome.")
        try:
            return await self.follow(task_id, after)
        except UnknownTask:
            raise EventsGone(task_id, after, 0) from None

    async def lost(self, record: TaskRecord) -> None:
        """End a task whose instance died (the sweep has marked its record failed: worker_lost)."""
        lost = WorkerLost("The instance running the task stopped before it ended; start a new task to retry.")

        def final_event(seq: int) -> bytes:
            event = TaskFailed(
                task_id=record.id, seq=seq, code=lost.code, detail=lost.detail, retryable=True, status=lost.status
            )
            return event.model_dump_json().encode()

        sessions = self._service.sessions
        if sessions is not None and record.session_id is not None:
            # Its hold on the session would otherwise last the task's whole timeout (on Redis).
            await sessions.store.release((record.api_key_id, record.session_id), record.id)
        completion = 0
        if record.background:  # only background tasks keep a log; the others' clients are gone with them
            try:
                await self.events.append_final(record.id, "task.failed", final_event)
            except Exception as exc:  # the log is unreachable: the record and the audit row still say it
                log.warning("task %s: could not log its final event (%s)", record.id, type(exc).__name__)
            completion = await self._streamed_tokens(record.id)
        transport = (
            "background" if record.background else str(((record.request or {}).get("audit") or {}).get("transport"))
        )
        self._metrics.tasks.labels(transport, lost.code).inc()
        if self._audit is not None:
            self._audit.submit(self._lost_row(record, lost, completion).row())

    async def _streamed_tokens(self, task_id: str) -> int:
        """The tokens a lost task is known to have streamed: its logged token.delta events (one each)."""
        count = 0
        try:
            reader = self.events.read(task_id, 0)
            await reader.start()
            async with aclosing(reader):
                async for event in _until_quiet(reader):
                    count += event.type == "token.delta"
        except (UnknownTask, AppError, OSError):
            pass  # nothing logged here (the in-process log of a process that is gone)
        return count

    def _lost_row(self, record: TaskRecord, lost: AppError, completion: int) -> AuditContext:
        described = (record.request or {}).get("audit") or {}
        audit = AuditContext(
            request_id=str(described.get("request_id") or record.id),
            route=str(described.get("route") or "/v1/tasks"),
            transport=str(described.get("transport") or "json"),
            created_at=record.created_at,
        )
        audit.api_key_id, audit.task_id = record.api_key_id, record.id
        audit.mode, audit.tier, audit.model, audit.provider = record.mode, record.tier, record.model, record.provider
        audit.status, audit.error_code = "failed", lost.code
        audit.http_status = 202 if record.background else None  # a plain task's answer died with its instance
        usage = Usage(record.prompt_tokens, completion)  # the admission's estimate of the first prompt
        try:
            cost = self._providers.route(record.model or "").cost(usage)
        except ModelNotFound:
            cost = audit.cost_usd  # a model no longer configured: no price to put on it
        audit.add_call(usage, cost, estimated=True, retries=0)
        return audit

    async def stop(self, reason: AppError, timeout_s: float) -> None:
        """End every background task running here with `reason` as its last event, waiting up to timeout_s."""
        for task_id in list(self._runs):
            task = self._service.running.get(task_id)
            if task is not None:
                task.spec.control.cancel(reason)
        if self._runs:
            await asyncio.wait(list(self._runs.values()), timeout=timeout_s)
        for run in list(self._runs.values()):  # still not done: cut off (its record says cancelled)
            run.cancel()


async def _iterate(reader: EventReader) -> AsyncIterator[LoggedEvent]:
    async with aclosing(reader):
        async for event in reader:
            yield event


async def _until_quiet(reader: EventReader) -> AsyncIterator[LoggedEvent]:
    # The final event was just appended, so the reader ends; bounded all the same.
    while True:
        try:
            event = await asyncio.wait_for(anext(reader), timeout=5.0)
        except (StopAsyncIteration, TimeoutError):
            return
        yield event
