"""`serve`'s process limits: the listen backlog (and the kernel's somaxconn cap), the open-files limit raised."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import ServerSettings, load_settings
from app.server import backlog_warning, raise_open_files_limit, somaxconn, uvicorn_options
from tests.support import ROOT, free_port, pacemaker_env, port_open, run_cli, server_config


def test_the_backlog_defaults_to_4096_and_reaches_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACEMAKER_"):
            monkeypatch.delenv(name)
    assert ServerSettings().backlog == 4096
    assert uvicorn_options(load_settings())["backlog"] == 4096
    monkeypatch.setenv("PACEMAKER_SERVER__BACKLOG", "512")
    assert uvicorn_options(load_settings())["backlog"] == 512


@pytest.mark.parametrize("value", [0, -1, 65536])
def test_a_backlog_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValidationError, match="backlog"):
        ServerSettings(backlog=value)


def test_a_backlog_above_somaxconn_is_warned_about(tmp_path: Path) -> None:
    cap = tmp_path / "somaxconn"
    cap.write_text("4096\n")
    assert somaxconn(cap) == 4096
    assert somaxconn(tmp_path / "missing") is None
    assert backlog_warning(4096, 4096) is None
    assert backlog_warning(100, 4096) is None
    assert backlog_warning(8192, None) is None  # not Linux: nothing to compare with
    warning = backlog_warning(8192, 4096)
    assert warning is not None
    assert "8192" in warning and "net.core.somaxconn 4096" in warning and "sysctl -w net.core.somaxconn=8192" in warning


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft, hard, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        before, after, reported_hard = raise_open_files_limit()
        assert (before, reported_hard) == (lowered, hard)
        assert after == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if hard != resource.RLIM_INFINITY:
            assert after == hard
        assert raise_open_files_limit() == (after, after, hard)  # already there: nothing to do
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files line")


def _listen_backlog(port: int) -> int | None:
    """The listening socket's backlog (ss shows it as Send-Q), or None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc (Linux)")
def test_serve_raises_its_open_files_limit_and_listens_with_the_backlog(tmp_path: Path) -> None:
    """A server started with a soft limit of 256 runs with the hard one, and logs both that and a backlog
    above somaxconn (which the kernel cuts to somaxconn)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = somaxconn()
    backlog = min(cap + 1, 65535) if cap is not None else 4096
    config = server_config(tmp_path, None, tools={"python": False})
    config["server"]["backlog"] = backlog
    env = pacemaker_env(tmp_path, config)
    run_cli(env, "migrate")
    port = free_port()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))

    with (tmp_path / "server.log").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=low_limit,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_open("127.0.0.1", port):
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.05)
        if hard != resource.RLIM_INFINITY:
            assert _soft_open_files(process.pid) == hard
        listening = _listen_backlog(port)
        if listening is not None and cap is not None:
            assert listening == min(backlog, cap)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    logged = (tmp_path / "server.log").read_text()
    if hard != resource.RLIM_INFINITY and hard > 256:
        assert f"open files limit raised from 256 to {hard} (the hard limit)" in logged
    if cap is not None and backlog > cap:
        assert f"server.backlog {backlog} is above net.core.somaxconn {cap}" in logged
