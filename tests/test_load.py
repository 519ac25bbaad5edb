"""The load scenarios (load/locustfile.py), every one headless for a few seconds against a real server,
with the keys made by load/README.md's own `keys create` lines and its `-u 50`: none may fail."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT, server_config, start_pacemaker

README = ROOT / "load" / "README.md"
KEY_LINE = re.compile(r"^export (PACEMAKER_\w+)=\$\(pacemaker keys create (.+) \| tail -n 1\)$", re.MULTILINE)
RUN_S = 10
# The limited key's limits as the README makes it, which are also the locustfile's defaults.
LIMITED_RPM, LIMITED_BURST = 60, 5

# (type, name) of every row the scenarios report; each must have requests and no failure.
ROWS = [
    ("POST", "/v1/tasks [json]"),
    ("POST", "/v1/tasks [sse]"),
    ("TTFT", "/v1/tasks [sse]"),
    ("POST", "/v1/tasks [tool call]"),
    ("TTFT", "/v1/tasks [tool call]"),
    ("WS", "/v1/ws [connect]"),
    ("WS", "/v1/ws [task]"),
    ("TTFT", "/v1/ws [task]"),
    ("POST", "/v1/tasks [background]"),
    ("GET", "/v1/tasks/{id}/events"),
    ("GET", "/v1/tasks/{id}/events [resume]"),
    ("EVENTS", "/v1/tasks/{id}/events [check]"),
    ("TTFT", "/v1/tasks [background]"),
    ("POST", "/v1/chat/completions [json]"),
    ("POST", "/v1/chat/completions [stream]"),
    ("TTFT", "/v1/chat/completions [stream]"),
    ("POST", "/v1/tasks [key: load]"),
    ("TTFT", "/v1/tasks [key: load]"),
    ("POST", "/v1/tasks [key: limited]"),
    ("POST", "/v1/tasks [key: limited, refused]"),
]


def test_every_scenario_runs_without_a_failure_with_the_documented_keys(tmp_path: Path) -> None:
    lines = KEY_LINE.findall(README.read_text())
    assert sorted(name for name, _ in lines) == ["PACEMAKER_API_KEY", "PACEMAKER_LOAD_LIMITED_KEY"], lines
    assert f"--rpm {LIMITED_RPM} --burst {LIMITED_BURST}" in dict(lines)["PACEMAKER_LOAD_LIMITED_KEY"]
    # The README's quick local target: the simulated provider at 200 tokens a second.
    config = server_config(tmp_path, None, providers={"simulated": {"kind": "simulated", "tokens_per_second": 200}})
    server = start_pacemaker(tmp_path, config)
    try:
        # As the README's `$(pacemaker keys create ... | tail -n 1)` does: the key is the last line.
        keys = {name: server.cli("keys", "create", *shlex.split(args)).stdout.splitlines()[-1] for name, args in lines}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PACEMAKER_", "LOCUST_"))}
        env.update(keys)
        prefix = tmp_path / "load"
        command = [
            sys.executable, "-m", "locust", "-f", str(ROOT / "load" / "locustfile.py"), "--host", server.base_url,
            "--headless", "-u", "50", "-r", "50", "-t", f"{RUN_S}s", "--stop-timeout", "30",
            "--only-summary", "--csv", str(prefix),
        ]  # fmt: skip
        started = time.monotonic()
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
        elapsed = time.monotonic() - started
    finally:
        server.process.stop()
    output = (run.stdout + run.stderr)[-6000:]
    with open(f"{prefix}_stats.csv", newline="") as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    for row in ROWS:
        assert row in rows, f"no {row} row: the scenario did not run\n{output}"
        assert int(rows[row]["Request Count"]) > 0, f"{row} made no request\n{output}"
        assert int(rows[row]["Failure Count"]) == 0, f"{row} failed\n{output}"
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, output
    assert run.returncode == 0, output
    # Several tasks on each socket (four a round; a round cut by the end of the run reports only the
    # tasks that ended), and the limited key held to its bucket.
    sockets = int(rows[("WS", "/v1/ws [connect]")]["Request Count"])
    assert int(rows[("WS", "/v1/ws [task]")]["Request Count"]) >= 3 * sockets
    admitted = int(rows[("POST", "/v1/tasks [key: limited]")]["Request Count"])
    assert admitted <= LIMITED_BURST + LIMITED_RPM * elapsed / 60 + 1, (admitted, elapsed)
