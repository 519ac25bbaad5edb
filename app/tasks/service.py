"""The task service: owns a task from admission to its final record, whatever the transport.

Routes and sockets only render its events. For every task, and only here: the spec is built and
refused if it cannot run, the audit row is described, the request is admitted (limits, budget,
concurrency), the agent runs, the outcome is counted, the audit row is written, and what the task
held is released, also when its consumer goes away or it is cancelled from elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.types import Scope

from app.agent.events import TaskCompleted, TaskFailed, outcome_of
from app.agent.runner import Event, TaskSpec, run_agent
from app.agent.schemas import TaskCreate
from app.audit.context import AuditContext, outcome_status
from app.audit.sink import AuditSink
from app.auth.principal import Principal
from app.config import Settings
from app.enforcement.enforcer import Enforcer
from app.errors import AppError
from app.observability.metrics import Metrics
from app.providers.registry import ProviderRegistry
from app.tasks.spec import build_task_spec
from app.tools.invoke import ToolInvoker
from app.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

Transport = str  # json, sse, ws


@dataclass(slots=True)
class AdmittedTask:
    """A task that passed admission: it must be run (`TaskService.run`) or closed (`TaskService.close`)."""

    spec: TaskSpec
    transport: Transport
    audit: AuditContext  # the one carrier of the task's audit row, also reached through its ticket
    last: Event | None = None
    finished: bool = field(default=False)

    @property
    def id(self) -> str:
        return self.spec.id


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
    ) -> None:
        self._settings = settings
        self._providers = providers
        self._tools = tools
        self._invoker = invoker
        self._enforcer = enforcer
        self._metrics = metrics
        self._audit = audit
        self._content_chars = settings.audit.content_max_chars if settings.audit.store_content else 0
        self._running: dict[str, AdmittedTask] = {}  # on this instance, by id

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
        try:
            spec = build_task_spec(
                body,
                settings=self._settings,
                providers=self._providers,
                tools=self._tools,
                stream=stream,
                principal=principal,
            )
            self._describe(audit, spec, body, transport)
            spec.ticket = await self._enforcer.admit(
                principal,
                route=spec.route,
                prompt_tokens=spec.prompt_tokens or 0,
                max_tokens=spec.max_tokens,
                scope=scope,
                audit=audit,
            )
        except AppError as exc:
            audit.status, audit.error_code, audit.http_status = "rejected", exc.code, exc.status
            raise
        audit.owned_by_task = True
        task = AdmittedTask(spec, transport, audit)
        self._running[spec.id] = task
        return task

    async def run(self, task: AdmittedTask) -> AsyncGenerator[Event, None]:
        """The task's events, from task.started to its final one; closing early cancels it."""
        try:
            async with aclosing(run_agent(task.spec, self._metrics, self._invoker)) as events:
                async for event in events:
                    task.last = event
                    yield event
        finally:
            await self.close(task)

    async def close(self, task: AdmittedTask) -> None:
        """The task's end, once, however it ended (its last event says how; none: the consumer left)."""
        if task.finished:
            return
        task.finished = True
        self._running.pop(task.id, None)
        last = task.last
        outcome = outcome_of(last)
        self._metrics.tasks.labels(task.transport, outcome).inc()
        audit = task.audit
        audit.status, audit.error_code = outcome_status(outcome)
        if isinstance(last, TaskCompleted):
            audit.model, audit.provider = last.model, last.provider  # the model that really answered
            if self._content_chars:
                audit.output = last.output[: self._content_chars]
        if task.transport == "json":
            audit.http_status = last.status if isinstance(last, TaskFailed) else 200
        elif task.transport == "sse":
            audit.http_status = 200  # the stream had begun: failures went in-band
        try:
            if task.spec.ticket is not None:
                await task.spec.ticket.close()  # frees the concurrency slot; a stream held it until now
        finally:
            if self._audit is not None:
                self._audit.submit(audit.row())

    def cancel(self, task_id: str) -> bool:
        """Cancel a task running on this instance: its last event will be task.failed (cancelled)."""
        task = self._running.get(task_id)
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
        audit.model = spec.route.name
        audit.provider = spec.route.provider.name
        if self._content_chars:
            audit.prompt = spec.query[: self._content_chars]
