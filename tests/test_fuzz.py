"""Schemathesis against the live schema of a real server: no input, with or without a key, gives a 5xx or
an answer the schema does not describe.

Seeded and bounded so that it runs in about a minute inside `make test`; `make fuzz` runs it longer
(PACEMAKER_FUZZ_EXAMPLES sets the examples per operation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PacemakerServer, server_config, start_pacemaker

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
EXAMPLES = int(os.environ.get("PACEMAKER_FUZZ_EXAMPLES", "120"))
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[tuple[PacemakerServer, str]]:
    """A server with no per-key limits (a 429 would only hide what lies behind it) and an admin key."""
    workdir = tmp_path_factory.mktemp("fuzz")
    config = server_config(
        workdir, fake_upstream, limits={"rpm": None, "tpm": None, "max_concurrency": 100}, retries={"max_retries": 0}
    )
    server = start_pacemaker(workdir, config)
    admin = json.loads(server.cli("keys", "create", "--name", "fuzz-admin", "--admin", "--json").stdout)["key"]
    yield server, admin
    server.process.stop()


@pytest.mark.parametrize(
    ("who", "examples"),
    [("admin key", EXAMPLES), ("no key", max(20, EXAMPLES // 4)), ("bad key", max(20, EXAMPLES // 4))],
)
def test_every_operation_conforms_to_the_schema_and_never_fails_on_its_own(
    fuzzed: tuple[PacemakerServer, str], tmp_path: Path, who: str, examples: int
) -> None:
    server, admin = fuzzed
    headers = {
        "admin key": ["-H", f"Authorization: Bearer {admin}"],
        "no key": [],
        "bad key": ["-H", "Authorization: Bearer pk_not_a_key_at_all"],
    }[who]
    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{server.base_url}/openapi.json",
            *headers,
            "--checks",
            CHECKS,
            "--max-examples",
            str(examples),
            "--seed",
            "20261201",
            "--workers",
            "1",
            "--no-shrink",
            "--request-timeout",
            "30",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
    )
    assert result.returncode == 0, (
        f"{who}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}\n{server.process.output()}"
    )
    assert "Traceback" not in server.process.output(), "no input may reach an unhandled error, even one answered 4xx"
