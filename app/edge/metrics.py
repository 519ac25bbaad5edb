"""The edge's metrics: refusals by reason, requests let through by a known key, and the shared backend's failures."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True, slots=True)
class EdgeMetrics:
    refusals: Counter  # by reason: rate, failed_auth
    known_key: Counter  # requests of an address over a limit, served because their key was already known
    backend_errors: Counter  # calls to the shared (Redis) counters that failed: answered in process instead

    @classmethod
    def register(cls, registry: CollectorRegistry) -> EdgeMetrics:
        return cls(
            refusals=Counter(
                "pacemaker_edge_refusals_total",
                "Requests refused before authentication (429 edge_rate_limited), by reason: rate (requests per"
                " address) or failed_auth (failed authentications per address).",
                ["reason"],
                registry=registry,
            ),
            known_key=Counter(
                "pacemaker_edge_known_key_admissions_total",
                "Requests from an address over an edge limit that were served because their key was already known"
                " good (in the key cache): they cost no key lookup.",
                registry=registry,
            ),
            backend_errors=Counter(
                "pacemaker_edge_backend_errors_total",
                "Calls to the edge's shared counters (Redis) that failed; those requests were counted in process.",
                registry=registry,
            ),
        )
