"""The session pool's metrics: what it holds, what it evicted and why, and how often a session was found."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True, slots=True)
class SessionMetrics:
    bytes: Gauge  # in process: stored turn bytes of every session
    sessions: Gauge  # in process: sessions held
    evictions: Counter  # by reason: ttl and lru evict sessions, size drops a session's oldest turns
    lookups: Counter  # by result: hit (the session had turns) or miss

    @classmethod
    def register(cls, registry: CollectorRegistry) -> SessionMetrics:
        return cls(
            bytes=Gauge(
                "pacemaker_session_bytes",
                "Bytes of stored turns held by the in-process session pool.",
                registry=registry,
            ),
            sessions=Gauge("pacemaker_sessions", "Sessions held by the in-process session pool.", registry=registry),
            evictions=Counter(
                "pacemaker_session_evictions_total",
                "Sessions evicted (reason ttl or lru), or oldest turns dropped to keep a session within"
                " max_session_bytes (reason size).",
                ["reason"],
                registry=registry,
            ),
            lookups=Counter(
                "pacemaker_session_lookups_total",
                "Session loads by a task: hit (earlier turns found) or miss (a new or forgotten session).",
                ["result"],
                registry=registry,
            ),
        )
