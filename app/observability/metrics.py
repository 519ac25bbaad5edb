"""Pacemaker's own Prometheus metrics, on a registry per app (never the process-global one)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from app.durable.metrics import WriterMetrics
from app.edge.metrics import EdgeMetrics
from app.sessions.metrics import SessionMetrics

_LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Time to first token: from well under a second to the long prompts of large models.
_FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30)
# Tools: a calculator in microseconds, an HTTP tool or a sandboxed run in seconds.
_TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Every counter and histogram would also export a <name>_created series, doubling the series count
# for a timestamp Prometheus does not use. Process-wide in prometheus_client, as is this choice.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...; python_gc_*.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status class.",
            ["method", "handler", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration (to the end of the body, streams included) by route template.",
            ["method", "handler"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "pacemaker_active_streams",
            "Open SSE streams and WebSocket tasks.",
            ["transport"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "pacemaker_tokens_total",
            "Tokens by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.llm_calls = Counter(
            "pacemaker_llm_calls_total",
            "Model calls by model and outcome (an error code or ok).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.llm_seconds = Histogram(
            "pacemaker_llm_call_seconds",
            "Duration of model calls.",
            ["model"],
            buckets=_LLM_BUCKETS,
            registry=self.registry,
        )
        self.tool_calls = Counter(
            "pacemaker_tool_calls_total",
            "Tool calls by tool and outcome.",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.llm_first_token_seconds = Histogram(
            "pacemaker_llm_time_to_first_token_seconds",
            "Time from the start of a streamed model call to its first token (text or tool call), by model.",
            ["model"],
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.tool_seconds = Histogram(
            "pacemaker_tool_call_duration_seconds",
            "Duration of tool calls that ran (not those refused before running), by tool.",
            ["tool"],
            buckets=_TOOL_BUCKETS,
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "pacemaker_upstream_request_duration_seconds",
            "Duration of each request to a model provider (each retry on its own) to the end of its body, by provider.",
            ["provider"],
            buckets=_LLM_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "pacemaker_rejections_total",
            "Requests refused by enforcement, by reason (the error code).",
            ["reason"],
            registry=self.registry,
        )
        # Load shedding (app/overload.py): the lag is measured with shedding off too.
        self.loop_lag = Gauge(
            "pacemaker_event_loop_lag_seconds",
            "How late the event loop runs a ready callback: p90 over the last second.",
            registry=self.registry,
        )
        self.shedding = Gauge(
            "pacemaker_load_shedding", "1 while new work is refused with 503 overloaded.", registry=self.registry
        )
        self.shed_requests = Counter(
            "pacemaker_shed_requests_total",
            "New tasks, chat completions and tool calls refused as overloaded, by reason (loop_lag, rss).",
            ["reason"],
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "pacemaker_breaker_state",
            "Circuit breaker state per upstream and tool: 0 closed, 1 half-open, 2 open.",
            ["breaker"],
            registry=self.registry,
        )
        self.limiter_errors = Counter(
            "pacemaker_limiter_backend_errors_total",
            "Calls to the shared limiter backend (Redis) that failed.",
            registry=self.registry,
        )
        # Labelled by key id (bounded by the number of keys); never by the key itself.
        self.budget_remaining = Gauge(
            "pacemaker_budget_remaining_usd",
            "Budget left for the current period, per key id.",
            ["key_id"],
            registry=self.registry,
        )
        self.llm_retries = Counter(
            "pacemaker_llm_retries_total",
            "Model calls retried after an upstream error, by model.",
            ["model"],
            registry=self.registry,
        )
        self.audit_queue_depth = Gauge(
            "pacemaker_audit_queue_depth", "Audit rows waiting to be written.", registry=self.registry
        )
        self.audit_flush_seconds = Histogram(
            "pacemaker_audit_flush_seconds", "Time to write one batch of audit rows.", registry=self.registry
        )
        self.audit_rows_written = Counter(
            "pacemaker_audit_rows_written_total", "Audit rows written to the database.", registry=self.registry
        )
        self.audit_rows_spooled = Counter(
            "pacemaker_audit_rows_spooled_total",
            "Audit rows memory let go of (the queue was full): read back from the journal.",
            registry=self.registry,
        )
        self.audit_rows_replayed = Counter(
            "pacemaker_audit_rows_replayed_total",
            "Audit rows written to the database from the journal on disk.",
            registry=self.registry,
        )
        self.audit_spool_errors = Counter(
            "pacemaker_audit_spool_errors_total",
            "Failed writes to the audit journal: rows it could not take (held in memory only), failed fsyncs.",
            registry=self.registry,
        )
        self.audit_rows_dead_lettered = Counter(
            "pacemaker_audit_rows_dead_lettered_total",
            "Audit rows the database refused for their content, kept in the dead-letter directory.",
            registry=self.registry,
        )
        self.tasks = Counter(
            "pacemaker_tasks_total",
            "Finished tasks by transport and outcome.",
            ["transport", "outcome"],
            registry=self.registry,
        )
        # The task table's writer: pacemaker_task_records_{queue_depth,flush_seconds,written_total,...}.
        self.task_records = WriterMetrics.register(self.registry, "pacemaker_task_records", "Task records")
        # The session pool: pacemaker_session_bytes, pacemaker_sessions, ..._evictions_total, ..._lookups_total.
        self.sessions = SessionMetrics.register(self.registry)
        # Edge limits (app/edge/): pacemaker_edge_refusals_total{reason}, ..._known_key_admissions_total, ...
        self.edge = EdgeMetrics.register(self.registry)
        self._model_series: dict[tuple[str, str], ModelSeries] = {}

    def model(self, model: str, provider: str) -> ModelSeries:
        """The series of one model's calls (labels looked up once: 2 us each, five per call)."""
        series = self._model_series.get((model, provider))
        if series is None:
            series = self._model_series[(model, provider)] = ModelSeries(self, model, provider)
        return series


class ModelSeries:
    """One model's children of the model-call metrics, each made when first used (as labels() makes it)."""

    __slots__ = ("_calls", "_first_token", "_metrics", "_model", "_provider", "_seconds", "_tokens", "_upstream")

    def __init__(self, metrics: Metrics, model: str, provider: str) -> None:
        self._metrics, self._model, self._provider = metrics, model, provider
        self._calls: dict[str, Counter] = {}
        self._tokens: dict[str, Counter] = {}
        self._seconds: Histogram | None = None
        self._first_token: Histogram | None = None
        self._upstream: Histogram | None = None

    def calls(self, outcome: str) -> Counter:
        counter = self._calls.get(outcome)
        if counter is None:
            counter = self._calls[outcome] = self._metrics.llm_calls.labels(self._model, outcome)
        return counter

    def tokens(self, kind: str) -> Counter:
        counter = self._tokens.get(kind)
        if counter is None:
            counter = self._tokens[kind] = self._metrics.tokens.labels(self._model, kind)
        return counter

    def seconds(self) -> Histogram:
        if self._seconds is None:
            self._seconds = self._metrics.llm_seconds.labels(self._model)
        return self._seconds

    def first_token(self) -> Histogram:
        if self._first_token is None:
            self._first_token = self._metrics.llm_first_token_seconds.labels(self._model)
        return self._first_token

    def upstream(self) -> Histogram:
        if self._upstream is None:
            self._upstream = self._metrics.upstream_seconds.labels(self._provider)
        return self._upstream
