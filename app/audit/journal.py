"""The audit journal: the durable journal (app/durable/journal.py), its rows decoded by audit_record's column types."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from app.audit.models import AuditRecord
from app.durable import journal
from app.durable.journal import Line, Segment, encode

CODEC = journal.RowCodec.of(AuditRecord.__table__)  # type: ignore[attr-defined]
decode = CODEC.decode


class Journal(journal.Journal):
    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(directory, CODEC, clock=clock)


__all__ = ["CODEC", "Journal", "Line", "Segment", "decode", "encode"]
