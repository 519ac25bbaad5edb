"""The one Settings object: defaults < YAML file (PACEMAKER_CONFIG) < PACEMAKER_* environment."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from app.cors import CorsSettings
from app.edge.settings import EdgeSettings
from app.sandbox.settings import SandboxSettings
from app.sessions.settings import SessionsSettings
from app.tasks.events.settings import EventsSettings

Tier = Literal["small", "medium", "large"]
Mode = Literal["simple", "complex", "research"]

CONFIG_FILE_ENV = "PACEMAKER_CONFIG"


class _Section(BaseModel):
    # A misspelt setting is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    access_log: bool = False
    # Behind a reverse proxy: take the client address from X-Forwarded-For, from these proxies only.
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    # A comment line on idle SSE streams, so proxies do not close them.
    sse_ping_seconds: float = Field(15.0, gt=0)
    ws_max_tasks_per_socket: int = Field(16, ge=1)
    ws_max_per_key: int = Field(64, ge=1, description="Open WebSockets per key, per instance; beyond: 429.")
    # JSON bodies and WebSocket messages nested deeper than this are refused while parsing (422).
    max_json_depth: int = Field(64, ge=2, le=200)
    # The listen socket's accept queue: connections the kernel completes and holds until the server
    # accepts them (a storm of new streams waits here). Linux caps it at net.core.somaxconn (4096 since
    # kernel 5.4, 128 before): a larger value is cut to that, and `serve` warns.
    backlog: int = Field(4096, ge=1, le=65535)
    # A connection that has not sent its whole request head within this is closed (slowloris).
    header_timeout_s: float = Field(10.0, gt=0)
    # A request line and headers larger than this get 431 (uvicorn's httptools protocol has no cap:
    # one connection once sent 200 MB of headers in 0.8 s and grew the server by 300 MB).
    max_header_bytes: int = Field(65_536, ge=4096)
    # On SIGTERM: readiness says 503 at once while the listener stays open this long (load balancers
    # stop sending), then in-flight work has until drain_timeout_s (from the signal) to end.
    drain_grace_s: float = Field(5.0, ge=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    # Load shedding (off when unset): new work gets 503 overloaded while the event loop's lag (p90
    # over the last second) or the resident set is above these. The README has production values.
    shed_loop_lag_ms: float | None = Field(None, gt=0)
    shed_rss_mb: float | None = Field(None, gt=0)
    # Off: GET /metrics answers 404, and `serve --workers N` may run several workers (with metrics on
    # it refuses: each scrape would reach one worker and get that process's figures only).
    metrics: bool = True
    # Which web pages of other origins may call the API (and open WebSockets); none by default.
    cors: CorsSettings = CorsSettings()
    # Per client address, before authentication: requests, and failed authentications (app/edge/).
    edge: EdgeSettings = EdgeSettings()
    # POST /v1/chat/completions and POST /v1/tasks on the pure-ASGI fast path (app/fast_path.py), the
    # same guarantees without the framework's layers; off: through the whole stack, as every other route.
    chat_fast_path: bool = True
    tasks_fast_path: bool = True


class DatabaseSettings(_Section):
    url: str = "sqlite+aiosqlite:///./var/pacemaker.db"
    echo: bool = False
    pool_size: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _async_driver(self) -> DatabaseSettings:
        if not (self.url.startswith("sqlite+aiosqlite://") or self.url.startswith("postgresql+asyncpg://")):
            raise ValueError("database url must use sqlite+aiosqlite:// or postgresql+asyncpg://")
        return self


class AuthSettings(_Section):
    # How long a key lookup is trusted before the database is asked again: a revoked key keeps
    # working on a running server for at most this long.
    key_cache_seconds: float = Field(30.0, ge=0)
    key_cache_size: int = Field(10_000, ge=1)
    # A key lookup the database does not answer within this is a 503 auth_unavailable.
    lookup_timeout_s: float = Field(2.0, gt=0)
    # Where `make run` keeps the plaintext of the development key it creates (mode 0600).
    dev_key_file: Path = Path("var/dev-key")


class ProviderSettings(_Section):
    kind: Literal["openai", "simulated"]
    # openai: any OpenAI-compatible upstream.
    base_url: str | None = None
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0, description="Longest silence allowed between bytes.")
    # Upstream connections open at once (the session's pool, sized by the largest of these): each held
    # stream is one, so this caps the streams an instance holds (past it, new calls wait for a connection).
    max_connections: int = Field(16_384, ge=1)
    # simulated: how fast tokens are streamed; 0 streams without delay.
    tokens_per_second: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> ProviderSettings:
        if self.kind == "openai":
            if not self.base_url:
                raise ValueError("an openai provider needs base_url")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError("base_url must start with http:// or https://")
        return self


class ModelSettings(_Section):
    provider: str
    # The name the upstream knows the model by; defaults to the public name.
    upstream_model: str | None = None
    # Used while this model's circuit breaker is open (a model name from `models`).
    fallback: str | None = None
    # Prices in USD per million tokens; unset ones come from `prices` by upstream model name.
    input_usd_per_mtok: Decimal | None = Field(None, ge=0)
    output_usd_per_mtok: Decimal | None = Field(None, ge=0)
    cached_input_usd_per_mtok: Decimal | None = Field(None, ge=0)
    # The model's context in tokens: a session's oldest turns are left out beyond it.
    context_tokens: int = Field(128_000, ge=1)


class PriceSettings(_Section):
    input_usd_per_mtok: Decimal = Field(ge=0)
    output_usd_per_mtok: Decimal = Field(ge=0)
    # Prompt tokens the upstream served from its cache; None: charged as ordinary input.
    cached_input_usd_per_mtok: Decimal | None = Field(None, ge=0)


def _price(input_usd: str, output_usd: str, cached_usd: str | None) -> PriceSettings:
    return PriceSettings(
        input_usd_per_mtok=Decimal(input_usd),
        output_usd_per_mtok=Decimal(output_usd),
        cached_input_usd_per_mtok=Decimal(cached_usd) if cached_usd is not None else None,
    )


def _default_prices() -> dict[str, PriceSettings]:
    """OpenAI's published list prices for common models (USD per million tokens: in, out, cached in).

    Prices change: check your provider's and override them in `prices` or on the model.
    """
    return {
        "gpt-4o": _price("2.50", "10.00", "1.25"),
        "gpt-4o-mini": _price("0.15", "0.60", "0.075"),
        "gpt-4.1": _price("2.00", "8.00", "0.50"),
        "gpt-4.1-mini": _price("0.40", "1.60", "0.10"),
        "gpt-4.1-nano": _price("0.10", "0.40", "0.025"),
        "o3": _price("2.00", "8.00", "0.50"),
        "o3-mini": _price("1.10", "4.40", "0.55"),
        "o4-mini": _price("1.10", "4.40", "0.275"),
        "gpt-3.5-turbo": _price("0.50", "1.50", None),
    }


class TierSettings(_Section):
    small: str = "sim-small"
    medium: str = "sim-medium"
    large: str = "sim-large"

    def model_for(self, tier: Tier) -> str:
        name: str = getattr(self, tier)
        return name


class LimitSettings(_Section):
    """Defaults for keys that set no limit of their own, and the process-wide limits."""

    rpm: int | None = Field(600, ge=1, description="Requests per minute per key (None: unlimited).")
    burst: int | None = Field(None, ge=1, description="Request bucket size (default: rpm).")
    tpm: int | None = Field(2_000_000, ge=1, description="Tokens per minute per key (None: unlimited).")
    max_concurrency: int = Field(10, ge=1, description="Requests in flight per key, per instance.")
    max_tokens_per_request: int | None = Field(None, ge=1, description="Estimated tokens ceiling per request.")
    budget_usd: Decimal | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] | None = None
    global_max_in_flight: int = Field(2000, ge=1, description="Requests in flight on this instance.")
    # Shared limits across instances: all of them point at one Redis.
    redis_url: str | None = None
    redis_failure_policy: Literal["fail_open", "fail_closed"] = "fail_open"
    expected_instances: int = Field(1, ge=1, description="fail_open: each instance allows limit / this.")
    max_background_tasks: int = Field(10, ge=1, description="Background tasks queued or running per key.")


class BreakerSettings(_Section):
    failure_rate_threshold: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(30.0, gt=0)
    min_calls: int = Field(10, ge=1)
    open_s: float = Field(30.0, gt=0)
    half_open_probes: int = Field(1, ge=1)


class RetrySettings(_Section):
    max_retries: int = Field(2, ge=0, le=10)
    base_delay_s: float = Field(0.2, ge=0)
    max_delay_s: float = Field(5.0, ge=0)
    timeout_step_s: float = Field(0.5, ge=0)
    max_retry_after_s: float = Field(10.0, ge=0)


class _DurableWriterSection(_Section):
    """What a durable writer (app/durable/: journal, batches, dead letters) is tuned by; each user sets
    its own sizes and journal directory."""

    flush_interval_s: float = Field(0.2, gt=0, description="Longest wait of a row for its batch; the journal's fsync.")
    write_timeout_s: float = Field(5.0, gt=0)
    retry_interval_s: float = Field(1.0, gt=0, description="How often a down database is tried again.")
    shutdown_timeout_s: float = Field(10.0, gt=0)
    startup_replay_timeout_s: float = Field(
        5.0, gt=0, description="How long start waits for the rows earlier processes left in the journal."
    )
    dead_letter_dir: Path | None = Field(
        None, description="Rows the database refuses for their content (default: <spool_dir>-dead-letter)."
    )


class AuditSettings(_DurableWriterSection):
    enabled: bool = True
    queue_size: int = Field(
        20_000, ge=1, description="Rows held in memory; beyond them the writer reads rows back from the journal."
    )
    batch_size: int = Field(500, ge=1)
    spool_dir: Path = Field(Path("var/audit-spool"), description="The journal: every row is appended here first.")
    # Prompts and outputs are not kept unless asked for, and then only their first characters.
    store_content: bool = False
    content_max_chars: int = Field(2000, ge=1)


class TaskSettings(_DurableWriterSection):
    """Task records (the task table), written as the audit log's rows are, and running tasks' leases."""

    queue_size: int = Field(
        2_000, ge=1, description="Records held in memory; beyond them the writer reads records back from the journal."
    )
    batch_size: int = Field(100, ge=1)
    spool_dir: Path = Field(Path("var/task-spool"), description="The journal: every record is appended here first.")
    read_timeout_s: float = Field(2.0, gt=0, description="Reads and direct writes that take longer fail (503).")
    lease_s: float = Field(30.0, gt=0, description="A running task's lease; a lapsed one is failed (worker_lost).")
    lease_renew_s: float = Field(5.0, gt=0, description="How often the instance running a task renews its lease.")

    @model_validator(mode="after")
    def _renewed_in_time(self) -> TaskSettings:
        if self.lease_renew_s >= self.lease_s:
            raise ValueError("lease_renew_s must be shorter than lease_s")
        return self


def _check_tool_url(url: str) -> None:
    """Refuse (ValueError) a tool URL that cannot work, or that HTTP clients and resolvers read differently.

    The host is a DNS name or a canonical IP literal: `127.1`, `2130706433` or `0x7f.1` mean
    127.0.0.1 to some parsers and a name to others. Checked at start, since at call time a
    failure would open the tool's circuit breaker.
    """
    import ipaddress
    import re
    from urllib.parse import urlsplit

    import yarl

    if re.search(r"[\x00-\x20\x7f\\]", url):
        raise ValueError("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
        client = yarl.URL(url)  # how aiohttp will read it
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    if "@" in parts.netloc:
        raise ValueError("must not hold credentials (user:password@host); send them with headers_from_env")
    if "#" in url:
        raise ValueError("must not have a fragment (#...)")
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError("must have a port from 1 to 65535 after ':', or none")
    host = parts.hostname or ""
    if not host:
        raise ValueError("must name a host")
    if parts.netloc.startswith("["):
        if "%" in host:
            raise ValueError(f"[{host}]: IPv6 zone ids (%...) are not supported")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}] is not an IPv6 address") from None
        return
    if re.fullmatch(r"[0-9]+(\.[0-9]+){3}", host):
        if any(part != str(int(part)) or int(part) > 255 for part in host.split(".")):
            raise ValueError(f"{host} is not a canonical IPv4 address (four numbers 0-255, no leading zeros)")
    else:
        _check_host_name(host)
    if (client.raw_host, client.explicit_port) != (host, port):
        raise ValueError(f"the HTTP client reads it as {client.raw_host}:{client.explicit_port}, not {host}:{port}")


def _check_host_name(host: str) -> None:
    import re

    if not host.isascii():
        raise ValueError(f"{host!r}: write an international host name in its ASCII form (xn--...)")
    labels = host.split(".")
    for label in labels:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label):
            raise ValueError(
                f"{host!r} is not a host name: each dot-separated label is 1-63 letters, digits or hyphens"
                " (not at either end), with no empty label or trailing dot"
            )
        if re.fullmatch(r"0x[0-9a-f]*|0[0-9]+", label):
            raise ValueError(f"{host!r}: {label!r} looks like a hex or octal number, which resolvers may read as one")
    if labels[-1].isdigit():
        raise ValueError(f"{host!r} is neither a host name (it ends in a number) nor a canonical IPv4 address")
    if len(host) > 253:
        raise ValueError(f"{host!r} is longer than 253 characters")


def _private_literal(url: str) -> str | None:
    """The host of a URL whose host is a private, loopback, link-local or reserved IP address, else None."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: every address it resolves to is checked at call time
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    # As the tool's own check at call time (app/tools/http.py), which would refuse every call.
    unreachable = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )
    return host if unreachable else None


class HttpToolSettings(_Section):
    """A tool that calls one HTTP endpoint, declared without code."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, description="JSON Schema")
    # Header name -> the environment variable holding its value (a token, say), read at start.
    headers_from_env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(10.0, gt=0, le=300)
    max_response_bytes: int = Field(1_048_576, ge=1)
    allow_private: bool = Field(False, description="Allow private, loopback and link-local addresses.")

    @field_validator("url")
    @classmethod
    def _callable_url(cls, url: str) -> str:
        _check_tool_url(url)
        return url

    @model_validator(mode="after")
    def _usable(self) -> HttpToolSettings:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(self.parameters)
        except SchemaError as exc:
            raise ValueError(f"parameters is not a valid JSON Schema: {exc.message}") from None
        missing = [variable for variable in self.headers_from_env.values() if variable not in os.environ]
        if missing:
            raise ValueError(f"headers_from_env: environment variable not set: {', '.join(missing)}")
        private = None if self.allow_private else _private_literal(self.url)
        if private is not None:
            raise ValueError(
                f"url: {private} is a private, loopback, link-local or reserved address, which a tool may"
                " call only with allow_private: true"
            )
        return self


class ToolsSettings(_Section):
    python: bool = Field(True, description="Offer the python tool (code run in the WebAssembly sandbox).")
    http: list[HttpToolSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ToolsSettings:
        names = [tool.name for tool in self.http]
        taken = {"calculator", "python"}
        for name in names:
            if name in taken:
                raise ValueError(f"http: the tool name {name!r} is taken")
            taken.add(name)
        return self


class AgentSettings(_Section):
    max_iterations: int = Field(8, ge=1, le=64)
    default_max_tokens: int = Field(1024, ge=1)
    max_tokens_ceiling: int = Field(32_768, ge=1)
    default_timeout_s: float = Field(300.0, gt=0)
    # Tool calls of one model turn that run at once (the rest wait for a slot).
    max_parallel_tools: int = Field(4, ge=1, le=64)
    system_prompt: str = "You are Pacemaker, a helpful agent. Use the tools offered when they help."


def _default_providers() -> dict[str, ProviderSettings]:
    return {"simulated": ProviderSettings(kind="simulated")}


def _default_models() -> dict[str, ModelSettings]:
    return {name: ModelSettings(provider="simulated") for name in ("sim-small", "sim-medium", "sim-large")}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PACEMAKER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    providers: dict[str, ProviderSettings] = Field(default_factory=_default_providers)
    models: dict[str, ModelSettings] = Field(default_factory=_default_models)
    prices: dict[str, PriceSettings] = Field(default_factory=_default_prices)
    tiers: TierSettings = TierSettings()
    agent: AgentSettings = AgentSettings()
    limits: LimitSettings = LimitSettings()
    audit: AuditSettings = AuditSettings()
    tasks: TaskSettings = TaskSettings()
    events: EventsSettings = EventsSettings()
    sessions: SessionsSettings = SessionsSettings()
    tools: ToolsSettings = ToolsSettings()
    sandbox: SandboxSettings = SandboxSettings()
    breakers: BreakerSettings = BreakerSettings()
    retries: RetrySettings = RetrySettings()

    @field_validator("providers", mode="before")
    @classmethod
    def _default_kind(cls, value: Any) -> Any:
        # So that PACEMAKER_PROVIDERS__SIMULATED__TOKENS_PER_SECOND=200 alone is enough.
        if isinstance(value, dict):
            for name, provider in value.items():
                if isinstance(provider, dict) and "kind" not in provider:
                    provider["kind"] = "simulated" if name == "simulated" else "openai"
        return value

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        for name, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(f"models.{name}.provider: no provider named {model.provider!r}")
            if model.fallback is not None and (model.fallback not in self.models or model.fallback == name):
                raise ValueError(f"models.{name}.fallback: no other model named {model.fallback!r}")
        for tier in ("small", "medium", "large"):
            name = self.tiers.model_for(tier)
            if name not in self.models:
                raise ValueError(f"tiers.{tier}: no model named {name!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get(CONFIG_FILE_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


class ConfigError(Exception):
    """Settings that cannot be used; the message names the offending field."""


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one readable ConfigError."""
    _refuse_unknown_environment()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "settings"
            lines.append(f"  {field}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def _refuse_unknown_environment() -> None:
    """pydantic-settings ignores PACEMAKER_* variables that name no setting; a typo should not pass."""
    known = {name.upper() for name in Settings.model_fields} | {CONFIG_FILE_ENV.removeprefix("PACEMAKER_")}
    for variable in os.environ:
        if variable.startswith("PACEMAKER_"):
            top = variable.removeprefix("PACEMAKER_").split("__", 1)[0]
            if top not in known:
                raise ConfigError(f"invalid configuration:\n  {variable}: no such setting")


def env_value(name: str) -> str | None:
    """An environment variable named by configuration (an HTTP tool's header secret, say)."""
    return os.environ.get(name)
