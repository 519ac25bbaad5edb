"""The `sessions` settings section: where conversations live, how long they are kept and their bounds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1024 * 1024


class SessionsSettings(BaseModel):
    # A misspelt setting is an error, not silently ignored (as in every app.config section).
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Tasks with a session_id carry on their session's conversation.")
    redis_url: str | None = Field(
        None, description="Conversations in Redis, shared by every instance (default: limits.redis_url)."
    )
    redis_prefix: str = Field("pacemaker:sessions", min_length=1, description="Redis: the prefix of every key.")
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Redis: a call that takes longer fails (a turn then is not stored, or 503)."
    )
    ttl_s: float = Field(86_400.0, gt=0, description="A session unused for this long is forgotten.")
    max_bytes: int = Field(
        64 * MIB, ge=1024, description="In process: the stored turns of every session together (bytes)."
    )
    max_session_bytes: int = Field(
        MIB, ge=256, description="One session's stored turns; beyond it its oldest turns are dropped, whole."
    )
    sweep_interval_s: float = Field(30.0, gt=0, description="In process: how often expired sessions are removed.")
    busy_retry_after_s: float = Field(
        1.0, gt=0, description="Retry-After of a 409 session_busy (a turn of the session is running)."
    )

    @model_validator(mode="after")
    def _session_fits_the_pool(self) -> SessionsSettings:
        if self.max_session_bytes > self.max_bytes:
            raise ValueError("max_session_bytes must not exceed max_bytes")
        return self
