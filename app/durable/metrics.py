"""The metrics of one durable writer: its queue, its batches, and what became of its rows."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True, slots=True)
class WriterMetrics:
    queue_depth: Gauge  # rows submitted and not yet committed
    flush_seconds: Histogram  # one batch's write
    rows_written: Counter
    rows_spooled: Counter  # rows memory let go of: read back from the journal
    rows_replayed: Counter  # rows written from the journal on disk
    spool_errors: Counter  # rows the journal could not take, failed fsyncs
    rows_dead_lettered: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry, prefix: str, rows: str) -> WriterMetrics:
        """A writer's metrics named `<prefix>_written_total` and so on, `rows` naming its rows in their help."""
        return cls(
            queue_depth=Gauge(f"{prefix}_queue_depth", f"{rows} waiting to be written.", registry=registry),
            flush_seconds=Histogram(
                f"{prefix}_flush_seconds", f"Time to write one batch of {rows.lower()}.", registry=registry
            ),
            rows_written=Counter(f"{prefix}_written_total", f"{rows} written to the database.", registry=registry),
            rows_spooled=Counter(
                f"{prefix}_spooled_total",
                f"{rows} memory let go of (the queue was full): read back from the journal.",
                registry=registry,
            ),
            rows_replayed=Counter(
                f"{prefix}_replayed_total", f"{rows} written to the database from the journal.", registry=registry
            ),
            spool_errors=Counter(
                f"{prefix}_spool_errors_total",
                f"Failed writes to the journal of {rows.lower()}: rows it could not take, failed fsyncs.",
                registry=registry,
            ),
            rows_dead_lettered=Counter(
                f"{prefix}_dead_lettered_total",
                f"{rows} the database refused for their content, kept in the dead-letter directory.",
                registry=registry,
            ),
        )
