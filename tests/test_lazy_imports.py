"""What only some deployments or requests need is not loaded until they need it (idle memory, per worker).

Checked in a fresh interpreter: an app on the embedded defaults (SQLite, no Redis, no HTTP tool,
tracing off), started, has not imported redis, jsonschema, the OpenTelemetry SDK, aiohttp,
wasmtime or SQLAlchemy's PostgreSQL dialect; the sandbox still runs code, and wasmtime is loaded then.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.redis_errors import backend_errors, redis_errors
from tests.support import ROOT, pacemaker_env, run_cli, server_config

LAZY = ["redis", "jsonschema", "opentelemetry.sdk", "wasmtime", "aiohttp", "sqlalchemy.dialects.postgresql"]

CHILD = """
import asyncio, json, sys
from app.config import load_settings
from app.main import create_app
from app.sandbox import ExecutionLimits

LAZY = json.loads(sys.argv[1])

async def main():
    app = create_app(load_settings())
    async with app.router.lifespan_context(app) as state:
        idle = [name for name in LAZY if name in sys.modules]
        sandbox = state["resources"].sandbox
        loaded_before = sandbox.loaded
        limits = ExecutionLimits(timeout_s=10, fuel=20_000_000_000, memory_mb=256, output_bytes=1 << 20)
        result = await sandbox.execute("print(6 * 7)", limits)
        print(json.dumps({
            "idle": idle,
            "loaded_before": loaded_before,
            "loaded_after": sandbox.loaded,
            "stdout": result.stdout,
            "wasmtime_after": "wasmtime" in sys.modules,
        }))

asyncio.run(main())
"""


def test_an_app_on_the_defaults_loads_none_of_them_until_needed(tmp_path: Path) -> None:
    config = server_config(tmp_path, None, sandbox={"sessions_dir": str(tmp_path / "sessions")})
    env = pacemaker_env(tmp_path, config)
    run_cli(env, "migrate")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(LAZY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["idle"] == []
    assert figures["loaded_before"] is False and figures["loaded_after"] is True
    assert figures["stdout"] == "42\n" and figures["wasmtime_after"] is True


def test_redis_errors_are_caught_once_redis_is_imported() -> None:
    # This test process has imported redis (above): its errors are in the tuples, with the others.
    assert RedisError in redis_errors(OSError) and OSError in redis_errors(OSError)
    assert set(backend_errors()) == {RedisError, ConnectionError, TimeoutError, OSError}
    caught = None
    try:
        raise RedisConnectionError("down")
    except redis_errors() as exc:
        caught = exc
    assert isinstance(caught, RedisError)
