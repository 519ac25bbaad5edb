"""The audit spool's rules for a directory shared by several processes, and for a segment that vanishes."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from app.audit.spool import Spool


def row(request_id: str) -> dict[str, object]:
    return {"request_id": request_id, "created_at": datetime.now(UTC), "cost_usd": Decimal("0.000000123")}


def test_rows_come_back_exactly_as_they_were_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([row("a"), row("b")])
    [segment] = spool.segments()
    [batch] = list(spool.read(segment, 10))
    assert [r["request_id"] for r in batch] == ["a", "b"]
    assert batch[0]["cost_usd"] == Decimal("0.000000123")
    assert isinstance(batch[0]["created_at"], datetime)


def test_a_live_process_segments_are_left_to_it_and_a_dead_ones_are_taken_over(tmp_path: Path) -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f"segment-{1:020d}-{exited.pid}-000001.jsonl").write_bytes(b"")
        (tmp_path / f"segment-{2:020d}-{live.pid}-000001.jsonl").write_bytes(b"")
        spool = Spool(tmp_path)
        spool.append([row("mine")])
        names = [path.name for path in spool.segments()]
    finally:
        live.kill()
        live.wait()
    assert any(f"-{exited.pid}-" in name for name in names)  # an orphan: ours to replay
    assert not any(f"-{live.pid}-" in name for name in names)  # still being written by its owner
    assert len(names) == 2


def test_an_append_after_the_current_segment_vanished_starts_a_new_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([row("first")])
    for segment in spool.segments():
        segment.unlink()  # replayed and removed by another process, say
    spool.append([row("second")])
    [segment] = spool.segments()
    assert [r["request_id"] for batch in spool.read(segment, 10) for r in batch] == ["second"]
