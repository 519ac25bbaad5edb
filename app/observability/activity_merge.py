"""What one instance reports to the activity feed each second (counters and gauges), and how reports merge."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from app.enforcement.breaker import BreakerState
from app.observability.activity import MINUTE_S, RATE_WINDOW_S, Activity, Histogram, add_histogram, percentile

if TYPE_CHECKING:
    from app.resources import Resources

_STATES = {BreakerState.CLOSED: "closed", BreakerState.HALF_OPEN: "half_open", BreakerState.OPEN: "open"}
_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}
RECENT_SHOWN = 30


def instance_report(activity: Activity, resources: Resources) -> dict[str, Any]:
    """The counters of `activity` and this instance's gauges, read once (never on the request path)."""
    report = activity.report()
    report["instance"] = activity.instance_id
    report["at"] = time.time()
    report["gauges"] = _gauges(resources)
    report["breakers"] = _breakers(resources)
    report["limiter"] = _limiter(resources)
    return report


def _gauges(resources: Resources) -> dict[str, Any]:
    streams = {
        sample.labels.get("transport", ""): sample.value
        for metric in resources.metrics.active_streams.collect()
        for sample in metric.samples
    }
    gauges: dict[str, Any] = {
        "sse_streams": int(streams.get("sse", 0)),
        "ws_tasks": int(streams.get("ws", 0)),
        "websockets": resources.websockets.open_total(),
        "background_tasks": len(resources.background.running()),
        "running_tasks": len(resources.tasks.running),
        "http_in_flight": resources.counters.active_requests,
    }
    audit = resources.audit
    gauges["audit"] = (
        {
            "queue_depth": audit.queue_depth,
            "spool_rows": audit.spooled_rows,
            "database_ok": audit.database_ok,
            "spool_error": audit.spool_error is not None,
            "dead_lettered": audit.dead_lettered,
        }
        if audit is not None
        else None
    )
    records = resources.tasks.store.writer
    gauges["task_records"] = {"queue_depth": records.queue_depth, "spool_rows": records.spooled_rows}
    sandbox = resources.sandbox
    if sandbox is None:
        gauges["sandbox"] = None
    else:
        workers, admitted = sandbox.settings.workers, sandbox.admitted
        gauges["sandbox"] = {
            "workers": workers,
            "busy": min(admitted, workers),
            "queued": max(0, admitted - workers),
            "capacity": sandbox.capacity,
        }
    return gauges


def _breakers(resources: Resources) -> list[dict[str, Any]]:
    found = []
    for breaker in resources.enforcer.breakers.all():
        kind, _, name = breaker.name.partition(":")
        found.append(
            {
                "name": name or breaker.name,
                "kind": "upstream" if kind == "model" else kind,
                "state": _STATES[breaker.state],
                "open_remaining_s": round(breaker.open_remaining(), 1),
            }
        )
    return found


def _limiter(resources: Resources) -> dict[str, Any]:
    limits = resources.settings.limits
    shared = limits.redis_url is not None
    return {
        "backend": "redis" if shared else "memory",
        "policy": limits.redis_failure_policy if shared else None,
        "degraded": bool(getattr(resources.enforcer.limiter, "degraded", False)),
    }


# --- merging ------------------------------------------------------------------------------------


def merge(reports: list[dict[str, Any]], cost_today: dict[str, float], *, shared: str) -> dict[str, Any]:
    """One snapshot of every instance's report: counters and gauges added up, histograms merged
    before their percentiles are taken, breakers by name at their worst state."""
    models: dict[str, dict[str, Any]] = {}
    statuses: dict[str, float] = {}
    codes: dict[str, float] = {}
    for report in reports:
        _add(statuses, report["statuses"])
        _add(codes, report["codes"])
        for name, entry in report["models"].items():
            merged = models.setdefault(name, {"latency": {}, "ttft": {}, **dict.fromkeys(_MODEL_SUMS, 0)})
            for field in _MODEL_SUMS:
                merged[field] += entry[field]
            add_histogram(merged["latency"], dict(entry["latency"]))
            add_histogram(merged["ttft"], dict(entry["ttft"]))
    for name in cost_today:
        models.setdefault(name, {"latency": {}, "ttft": {}, **dict.fromkeys(_MODEL_SUMS, 0)})
    per_model = {name: _model(entry, cost_today.get(name, 0.0)) for name, entry in sorted(models.items())}
    return {
        "type": "activity.snapshot",
        "at": max((report["at"] for report in reports), default=time.time()),
        "instances": len(reports),
        "instance_ids": sorted(report["instance"] for report in reports),
        "shared": shared,
        "window_s": RATE_WINDOW_S,
        "percentile_window_s": MINUTE_S,
        "requests": {
            "per_s": _rate(sum(report["requests"] for report in reports)),
            "errors_per_s": _rate(sum(report["errors"] for report in reports)),
            "by_status": {status: _rate(count) for status, count in sorted(statuses.items())},
            "errors_by_code": {code: _rate(count) for code, count in sorted(codes.items())},
        },
        "totals": {
            "tokens_in_per_s": round(sum(model["tokens_in_per_s"] for model in per_model.values()), 2),
            "tokens_out_per_s": round(sum(model["tokens_out_per_s"] for model in per_model.values()), 2),
            "cost_per_min_usd": round(sum(model["cost_per_min_usd"] for model in per_model.values()), 9),
            "cost_today_usd": round(sum(cost_today.values()), 9),
        },
        "models": per_model,
        "active": _gauge_sums(reports),
        "breakers": _merge_breakers(reports),
        "limiter": _merge_limiter(reports),
        "recent_tasks": sorted(
            (task for report in reports for task in report["recent_tasks"]),
            key=lambda task: task["started_at"] or "",
            reverse=True,
        )[:RECENT_SHOWN],
    }


_MODEL_SUMS = ("requests", "errors", "tokens_in", "tokens_out", "cost_minute")


def _model(entry: dict[str, Any], cost_today: float) -> dict[str, Any]:
    latency: Histogram = entry["latency"]
    ttft: Histogram = entry["ttft"]
    return {
        "requests_per_s": _rate(entry["requests"]),
        "errors_per_s": _rate(entry["errors"]),
        "tokens_in_per_s": _rate(entry["tokens_in"]),
        "tokens_out_per_s": _rate(entry["tokens_out"]),
        "cost_per_min_usd": round(entry["cost_minute"], 9),
        "cost_today_usd": round(cost_today, 9),
        "latency_ms": {"p50": percentile(latency, 50), "p95": percentile(latency, 95), "count": sum(latency.values())},
        "ttft_ms": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95), "count": sum(ttft.values())},
    }


def _rate(count: float) -> float:
    return round(count / RATE_WINDOW_S, 2)


def _add(into: dict[str, float], counts: dict[str, float]) -> None:
    for name, count in counts.items():
        into[name] = into.get(name, 0) + count


def _gauge_sums(reports: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for report in reports:
        for name, value in report["gauges"].items():
            if isinstance(value, dict):
                section = merged.get(name) or {}
                for field, figure in value.items():
                    # Flags hold for all (database_ok: every instance writes); figures add up.
                    if isinstance(figure, bool):
                        section[field] = section.get(field, True) and figure
                    else:
                        section[field] = section.get(field, 0) + figure
                merged[name] = section
            elif value is None:
                merged.setdefault(name, None)
            else:
                merged[name] = merged.get(name, 0) + value
    return merged


def _merge_breakers(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for report in reports:
        for breaker in report["breakers"]:
            key = (breaker["kind"], breaker["name"])
            seen = merged.setdefault(key, {**breaker, "instances": 0, "open_instances": 0})
            seen["instances"] += 1
            seen["open_instances"] += breaker["state"] != "closed"
            if _SEVERITY[breaker["state"]] > _SEVERITY[seen["state"]]:
                seen["state"] = breaker["state"]
            seen["open_remaining_s"] = max(seen["open_remaining_s"], breaker["open_remaining_s"])
    return [merged[key] for key in sorted(merged)]


def _merge_limiter(reports: list[dict[str, Any]]) -> dict[str, Any]:
    if not reports:
        return {}
    limiter = dict(reports[0]["limiter"])
    degraded = sum(1 for report in reports if report["limiter"]["degraded"])
    limiter["degraded"] = degraded > 0
    limiter["degraded_instances"] = degraded
    return limiter
