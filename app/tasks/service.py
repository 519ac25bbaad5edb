"""The task service: owns a task from admission to its final record, whatever the transport.

Routes and sockets only render its events. For every task, and only here: the spec is built and
refused if it cannot run, the audit row is described, the request is admitted (limits, budget,
concurrency, background slots), the admission record is written, the agent runs, the outcome is
counted, the final record and the audit row are written, and what the task held is released, also
when its consumer goes away or it is cancelled from elsewhere. Background tasks run detached from
any connection (app/tasks/background.py); their events go to the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from opentelemetry.trace import Span
from prometheus_client.metrics import Counter
from starlette.types import Scope

from app.agent.events import TaskCompleted, TaskFailed, outcome_of
from app.agent.runner import Event, TaskSpec, run_agent
from app.agent.schemas import TaskCreate
from app.audit.context import AuditContext, outcome_status
from app.audit.sink import AuditSink
from app.auth.principal import Principal
from app.config import Settings
from app.enforcement.enforcer import Enforcer
from app.errors import AppError, TaskFinished, TaskNotFound, TooManyBackgroundTasks
from app.observability import tracing
from app.observability.activity import Activity
from app.observability.metrics import Metrics
from app.providers.registry import ProviderRegistry
from app.sessions.conversation import Conversations, SessionTurn
from app.tasks.cancel_bus import CancelBus
from app.tasks.models import FINAL_VERSION, TaskRecord, TaskStatus, TaskToolCall
from app.tasks.spec import build_task_spec
from app.tasks.store import TaskStore
from app.tools.invoke import ToolInvoker
from app.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

Transport = str  # json, sse, ws
# Records of tasks that ended here lately, for lookups before the writer has them in the database.
_RECENT = 2_000


@dataclass(slots=True)
class AdmittedTask:
    """A task that passed admission: it must be run (`TaskService.run`) or closed (`TaskService.close`)."""

    spec: TaskSpec
    transport: Transport
    audit: AuditContext  # the one carrier of the task's audit row, also reached through its ticket
    record: TaskRecord  # as admitted; the final record is made from it
    session: SessionTurn | None = None  # its hold on its session_id's conversation
    last: Event | None = None
    finished: bool = field(default=False)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    span: Span | None = None  # its trace span (invoke_agent), while tracing is on

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def background(self) -> bool:
        return self.record.background


class TaskService:
    def __init__(
        self,
        *,
        settings: Settings,
        providers: ProviderRegistry,
        tools: ToolRegistry,
        invoker: ToolInvoker,
        enforcer: Enforcer,
        metrics: Metrics,
        audit: AuditSink | None,
        store: TaskStore,
        instance_id: str,
        sessions: Conversations | None = None,
        shared: bool = False,
    ) -> None:
        self._settings = settings
        self._providers = providers
        self._tools = tools
        self._invoker = invoker
        self._enforcer = enforcer
        self._metrics = metrics
        self._audit = audit
        self.store = store
        self.instance_id = instance_id
        # Other instances share the tasks (a shared event log, so Redis): they must see a background
        # task's admission at once, and count its background slots.
        self.shared = shared
        self.sessions = sessions  # None: sessions.enabled is false (a session_id names a workspace only)
        self._content_chars = settings.audit.content_max_chars if settings.audit.store_content else 0
        self.running: dict[str, AdmittedTask] = {}  # on this instance, by id
        self._recent: OrderedDict[str, TaskRecord] = OrderedDict()
        self.cancels: CancelBus | None = None  # set by the lifespan: it needs cancel_here
        self.activity: Activity | None = None  # set by the lifespan: the dashboard hears of starts and ends
        self._outcomes: dict[tuple[str, str], Counter] = {}  # tasks_total by (transport, outcome), looked up once

    # --- admission --------------------------------------------------------------------------

    async def admit(
        self,
        principal: Principal,
        body: TaskCreate,
        *,
        transport: Transport,
        audit: AuditContext,
        stream: bool,
        scope: Scope | None = None,
    ) -> AdmittedTask:
        """Build and admit a task, or raise the refusal (recorded in `audit`; whoever made the context
        writes the row of a refused request). From here on the task's row is the service's to write."""
        span = tracing.start_task(audit) if tracing.TRACER is not None else None
        token = tracing.current(span) if span is not None else None  # the admission's limiter calls are its children
        try:
            spec = build_task_spec(
                body,
                settings=self._settings,
                providers=self._providers,
                tools=self._tools,
                stream=stream or body.background,
                principal=principal,
            )
            self._describe(audit, spec, body, transport)
            if body.background:
                await self._check_background_slots(principal)
            # Before the limits: they must see the prompt with its history (409 session_busy, too).
            session = None
            if body.session_id is not None and self.sessions is not None:
                session = await self.sessions.open(principal.key_id, body.session_id, spec)
            try:
                spec.ticket = await self._enforcer.admit(
                    principal,
                    route=spec.route,
                    prompt_tokens=spec.prompt_tokens or 0,
                    max_tokens=spec.max_tokens,
                    scope=scope,
                    audit=audit,
                )
            except BaseException:
                if session is not None:
                    await session.release()
                raise
        except AppError as exc:
            audit.status, audit.error_code, audit.http_status = "rejected", exc.code, exc.status
            if span is not None:
                tracing.task_admitted(span, audit, "background" if body.background else transport)
                tracing.end_task(span, audit)
            raise
        finally:
            if token is not None:
                tracing.restore(token)
        audit.owned_by_task = True
        task = AdmittedTask(spec, transport, audit, self._admission_record(principal, body, spec, audit), session)
        if span is not None:
            task.span = span
            tracing.task_admitted(span, audit, "background" if task.background else transport)
        self.running[spec.id] = task
        if self.activity is not None:
            self.activity.task_started(task.record, principal.prefix, transport)
        if not (task.background and self.shared):
            self.store.submit(task.record)
            return task
        try:
            # Written before the 202, so that any other instance can answer for the task at once
            # (one transaction, ~0.8 ms of CPU: only where there are other instances); a database
            # that does not answer in time gets it through the journal instead.
            await self.store.write_now(task.record)
        except BaseException:
            await self.close(task)  # cancelled meanwhile: nobody will run it, so nothing may stay held
            raise
        return task

    async def _check_background_slots(self, principal: Principal) -> None:
        allowed = principal.limits.max_background_tasks or self._settings.limits.max_background_tasks
        here = sum(
            1 for task in self.running.values() if task.background and task.record.api_key_id == principal.key_id
        )
        active = here  # alone, this instance runs every one of them: no database read
        if self.shared:
            with contextlib.suppress(AppError):  # the database does not answer: count what this instance runs
                active = max(here, await self.store.count_active_background(principal.key_id))
        if active >= allowed:
            raise TooManyBackgroundTasks(
                f"This key has {active} background tasks queued or running (limit {allowed}).", retry_after=5.0
            )

    def _admission_record(
        self, principal: Principal, body: TaskCreate, spec: TaskSpec, audit: AuditContext
    ) -> TaskRecord:
        now = datetime.now(UTC)
        request = body.model_dump(exclude={"query", "mode", "stream", "background", "model", "model_tier"})
        # What a sweep needs to write the audit row of a task whose instance died.
        request["audit"] = {"request_id": audit.request_id, "transport": audit.transport, "route": audit.route}
        return TaskRecord(
            id=spec.id,
            api_key_id=principal.key_id,
            status="running",
            background=body.background,
            created_at=now,
            started_at=now,
            query=spec.query,
            mode=body.mode,
            tier=spec.tier,
            model=spec.route.name,
            provider=spec.route.provider.name,
            request=request,
            prompt_tokens=spec.prompt_tokens or 0,  # the estimate, until the end says what was spent
            usage_estimated=True,
            instance_id=self.instance_id,
            session_id=body.session_id,
            trace_id=audit.trace_id,
            # Every task holds a lease while it runs: if this process dies, another one ends it.
            lease_expires_at=now + timedelta(seconds=self._settings.tasks.lease_s),
        )

    # --- the run --------------------------------------------------------------------------------

    async def run(self, task: AdmittedTask) -> AsyncGenerator[Event, None]:
        """The task's events, from task.started to its final one; closing early cancels it."""
        agent = run_agent(task.spec, self._metrics, self._invoker)
        if task.span is not None:
            agent = tracing.in_span(task.span, agent)  # its model and tool calls are the task span's children
        try:
            async with aclosing(agent) as events:
                async for event in events:
                    # The session first: isinstance on a pydantic class runs its metaclass's check, per event.
                    if task.session is not None and isinstance(event, TaskCompleted):
                        event.session = await task.session.complete()  # its turn, before anyone hears it ended
                    task.last = event
                    yield event
        finally:
            await self.close(task)

    async def close(self, task: AdmittedTask) -> None:
        """The task's end, once, however it ended (its last event says how; none: the consumer left)."""
        if task.finished:
            return
        task.finished = True
        last = task.last
        outcome = outcome_of(last)
        self._count(task, outcome)
        audit = task.audit
        audit.status, audit.error_code = outcome_status(outcome)
        if isinstance(last, TaskCompleted):
            audit.model, audit.provider = last.model, last.provider  # the model that really answered
            if self._content_chars:
                audit.output = last.output[: self._content_chars]
        if task.background:
            audit.http_status = 202
        elif task.transport == "json":
            audit.http_status = last.status if isinstance(last, TaskFailed) else 200
        elif task.transport == "sse":
            audit.http_status = 200  # the stream had begun: failures went in-band
        if task.span is not None:
            tracing.end_task(task.span, audit)
        try:
            if task.session is not None:
                await task.session.release()  # a turn that appended nothing frees its session too
            if task.spec.ticket is not None:
                await task.spec.ticket.close()  # frees the concurrency slot; a stream held it until now
        finally:
            final = self._final_record(task, outcome)
            self._remember(final)
            if self.activity is not None:
                self.activity.task_ended(final, task.transport)
            # Journaled and written within a flush interval, as every record is; until then this
            # instance answers for it from _recent, and the task's final event says it ended.
            self.store.submit(final)
            self.running.pop(task.id, None)
            if self._audit is not None:
                self._audit.submit(audit.row())
            task.done.set()

    def _count(self, task: AdmittedTask, outcome: str) -> None:
        labels = ("background" if task.background else task.transport, outcome)
        counter = self._outcomes.get(labels)
        if counter is None:
            counter = self._outcomes[labels] = self._metrics.tasks.labels(*labels)
        counter.inc()

    def _final_record(self, task: AdmittedTask, outcome: str) -> TaskRecord:
        last, audit = task.last, task.audit
        status: TaskStatus = (
            "completed" if outcome == "completed" else "cancelled" if outcome == "cancelled" else "failed"
        )
        error_code = error_detail = output = None
        tool_calls: tuple[TaskToolCall, ...] = ()
        if isinstance(last, TaskCompleted):
            output = last.output
            tool_calls = tuple(
                TaskToolCall(call.tool, call.arguments, call.result, call.error, call.duration_ms)
                for call in last.tool_calls
            )
        elif isinstance(last, TaskFailed):
            error_code, error_detail = last.code, last.detail
        else:
            error_code, error_detail = "cancelled", "The client went away before the task ended."
        return replace(
            task.record,
            status=status,
            version=FINAL_VERSION,
            finished_at=datetime.now(UTC),
            model=audit.model,
            provider=audit.provider,
            output=output,
            tool_calls=tool_calls,
            # What the model calls spent (also those of a failed or cancelled task), as the audit row says.
            prompt_tokens=audit.prompt_tokens,
            completion_tokens=audit.completion_tokens,
            cost_usd=audit.cost_usd,
            usage_estimated=audit.usage_estimated,
            error_code=error_code,
            error_detail=error_detail,
            lease_expires_at=None,
        )

    def _remember(self, record: TaskRecord) -> None:
        self._recent[record.id] = record
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    # --- lookups and cancel ---------------------------------------------------------------------

    async def lookup(self, principal: Principal, task_id: str) -> TaskRecord:
        """The task as its newest record says, or TaskNotFound (also for another key's task, unless admin)."""
        running = self.running.get(task_id)
        record = running.record if running is not None else self._recent.get(task_id)
        if record is None:
            record = await self.store.get(task_id)
        if record is None or (record.api_key_id != principal.key_id and not principal.is_admin):
            raise TaskNotFound(f"No task {task_id!r} for this key.")
        return record

    async def cancel(self, principal: Principal, task_id: str, *, wait_s: float = 5.0) -> TaskRecord:
        """End a queued or running task, wherever it runs: its record once it has ended (or within
        `wait_s`, as it stands then). TaskFinished for one that had already ended."""
        record = await self.lookup(principal, task_id)
        if not record.active:
            raise TaskFinished(f"Task {task_id} has already ended ({record.status}).")
        if not self.cancel_here(task_id) and self.cancels is not None:
            await self.cancels.request(task_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while record.active and loop.time() < deadline:
            running = self.running.get(task_id)
            if running is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(running.done.wait(), deadline - loop.time())
            else:
                await asyncio.sleep(0.1)  # on another instance: its final record comes through the store
            record = await self.lookup(principal, task_id)
        return record

    def cancel_all(self, reason: AppError) -> None:
        """End every task running here, each with `reason` as its last event (a shutdown's drain)."""
        for task in list(self.running.values()):
            task.spec.control.cancel(reason)

    def cancel_here(self, task_id: str) -> bool:
        """Cancel a task running on this instance: its last event will be task.failed (cancelled)."""
        task = self.running.get(task_id)
        if task is None:
            return False
        task.spec.control.cancel()
        return True

    def refused(self, audit: AuditContext, error: AppError) -> None:
        """Write the row of a task refused where no HTTP request carries a row (a socket's task.create)."""
        audit.status, audit.error_code, audit.http_status = "rejected", error.code, error.status
        if self._audit is not None:
            self._audit.submit(audit.row())

    def _describe(self, audit: AuditContext, spec: TaskSpec, body: TaskCreate, transport: Transport) -> None:
        audit.transport = transport
        audit.task_id = spec.id
        audit.mode = body.mode
        audit.tier = spec.tier
        audit.session_id = body.session_id
        audit.model = spec.route.name
        audit.provider = spec.route.provider.name
        if self._content_chars:
            audit.prompt = spec.query[: self._content_chars]
