"""Settings: defaults, YAML file, environment, and refusals that name the field."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, load_settings
from tests.support import ROOT, free_port


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PACEMAKER_"):
            monkeypatch.delenv(name)


def test_defaults_run_on_sqlite_with_the_simulated_provider() -> None:
    settings = load_settings()
    assert settings.database.url.startswith("sqlite+aiosqlite://")
    assert settings.providers["simulated"].kind == "simulated"
    assert [settings.tiers.model_for(t) for t in ("small", "medium", "large")] == [
        "sim-small",
        "sim-medium",
        "sim-large",
    ]


def test_yaml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pacemaker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"port": 9001, "max_body_bytes": 4096},
                "providers": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key": "sk-x"}},
                "models": {"gpt-x": {"provider": "up", "input_usd_per_mtok": "0.15"}},
                "tiers": {"small": "gpt-x", "medium": "gpt-x", "large": "gpt-x"},
            }
        )
    )
    monkeypatch.setenv("PACEMAKER_CONFIG", str(config))
    monkeypatch.setenv("PACEMAKER_SERVER__PORT", "9002")
    settings = load_settings()
    assert settings.server.port == 9002  # the environment wins over the file
    assert settings.server.max_body_bytes == 4096
    assert settings.tiers.small == "gpt-x"
    assert str(settings.models["gpt-x"].input_usd_per_mtok) == "0.15"
    assert settings.providers["up"].api_key is not None
    assert "sk-x" not in repr(settings)  # secrets never print


def test_models_from_a_file_replace_the_defaults_and_tiers_must_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": {"only": {"provider": "simulated"}}, "tiers": {"small": "only"}}))
    monkeypatch.setenv("PACEMAKER_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"tiers\.medium: no model named 'sim-medium'"):
        load_settings()


def test_a_provider_section_from_the_environment_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACEMAKER_PROVIDERS__SIMULATED__TOKENS_PER_SECOND", "200")
    assert load_settings().providers["simulated"].tokens_per_second == 200


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("PACEMAKER_SERVER__PORT", "not-a-port", "server.port"),
        ("PACEMAKER_SERVER__PORT", "70000", "server.port"),
        ("PACEMAKER_DATABASE__URL", "mysql://x", "database"),
        ("PACEMAKER_DATABASE__URLX", "sqlite+aiosqlite:///x", "database.urlx"),
        ("PACEMAKER_TIERS__SMALL", "no-such-model", "tiers.small"),
        ("PACEMAKER_LOG_LEVEL", "LOUD", "log_level"),
        ("PACEMAKER_AGENT__MAX_ITERATIONS", "0", "agent.max_iterations"),
        ("PACEMAKER_NO_SUCH_SETTING", "1", "PACEMAKER_NO_SUCH_SETTING"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert named in str(refused.value)


def test_an_openai_provider_needs_a_base_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"providers": {"up": {"kind": "openai"}}}))
    monkeypatch.setenv("PACEMAKER_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"providers\.up.*base_url"):
        load_settings()


def test_a_model_must_name_a_known_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": {"m": {"provider": "ghost"}}}))
    monkeypatch.setenv("PACEMAKER_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"models\.m\.provider"):
        load_settings()


def test_the_server_refuses_to_start_on_bad_settings_with_a_readable_message() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}
    env["PACEMAKER_SERVER__PORT"] = "eighty"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "server.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PACEMAKER_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


@pytest.mark.parametrize(
    ("tool", "named"),
    [
        ({"headers_from_env": {"Authorization": "NO_SUCH_VARIABLE_HERE"}}, "NO_SUCH_VARIABLE_HERE"),
        ({"parameters": {"type": "banana"}}, "not a valid JSON Schema"),
        ({"name": "calculator"}, "is taken"),
        ({"url": "ftp://example.com"}, "tools.http.0.url"),
    ],
)
def test_http_tools_are_checked_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: dict[str, object], named: str
) -> None:
    declared = {"name": "lookup", "description": "d", "url": "https://example.com/x", **tool}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"tools": {"http": [declared]}}))
    monkeypatch.setenv("PACEMAKER_CONFIG", str(config))
    with pytest.raises(ConfigError, match=named):
        load_settings()


# Tool URLs that could never work, or that HTTP libraries and resolvers read differently: each with
# the words its refusal must hold.
BAD_TOOL_URLS = [
    ("http://2130706433:8401/", "ends in a number"),  # 127.0.0.1 to inet_aton, a name to others
    ("http://127.1:8401/", "ends in a number"),
    ("http://1.2.3.4.5/", "ends in a number"),
    ("http://0x7f.1:8401/", "hex or octal"),
    ("http://0x7f000001/", "hex or octal"),
    ("http://017700000001/", "hex or octal"),
    ("http://0177.0.0.1/", "not a canonical IPv4 address"),
    ("http://127.0.0.01/", "not a canonical IPv4 address"),
    ("http://256.1.1.1/", "not a canonical IPv4 address"),
    ("http://user:secret@example.com/", "credentials"),
    ("http://example.com/x#part", "fragment"),
    ("http://example.com:0/", "port"),
    ("http://example.com:/x", "port"),
    ("http://example.com:99999/", "Port out of range"),
    ("http://example.com:+80/", "Port could not be cast"),  # yarl reads it as 80, urllib refuses it
    ("http://exa_mple.com/", "not a host name"),
    ("http://example.com./", "not a host name"),
    ("http://-example.com/", "not a host name"),
    ("http://bücher.example/", "ASCII form"),
    ("http://[::1/", "not a valid URL"),
    ("http://[fe80::1%25eth0]/", "zone ids"),
    ("http://example.com\\@evil.com/", "backslashes"),
    ("http:///only-a-path", "must name a host"),
    # Private literals without allow_private: every call would be refused.
    ("http://127.0.0.1:8401/", "private, loopback"),
    ("http://10.1.2.3/", "private, loopback"),
    ("http://169.254.169.254/latest/meta-data", "private, loopback"),
    ("http://[::1]:8401/", "private, loopback"),
    ("http://[::ffff:127.0.0.1]/", "private, loopback"),
    ("http://0.0.0.0:8401/", "private, loopback"),
]
GOOD_TOOL_URLS = [
    ("https://api.example.com/v1/weather?units=metric", False),
    ("http://weather:8080/", False),  # a single-label service name
    ("http://163.com/", False),  # numeric labels are fine before the last one
    ("https://xn--bcher-kva.example/", False),
    ("http://Example.COM:8080/p", False),
    ("https://8.8.8.8/", False),
    ("https://[2606:4700:4700::1111]:443/dns-query", False),
    ("http://127.0.0.1:8401/", True),
    ("http://[::1]:8401/", True),
    ("http://10.1.2.3/", True),
]
# Syntax is refused on the field itself, a private address (which depends on allow_private) on the tool.
TOOL_URL_FIELD = re.compile(r"tools\.http\.0(\.url|: url):")


def _tool_config(tmp_path: Path, url: str, allow_private: bool = False) -> Path:
    tool = {"name": "lookup", "description": "d", "url": url, "allow_private": allow_private}
    config = tmp_path / f"tool-{uuid.uuid4().hex[:8]}.yaml"
    config.write_text(
        yaml.safe_dump(
            {"database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"}, "tools": {"http": [tool]}}
        )
    )
    return config


@pytest.mark.parametrize(("url", "reason"), BAD_TOOL_URLS)
def test_tool_urls_that_cannot_work_are_refused_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, reason: str
) -> None:
    monkeypatch.setenv("PACEMAKER_CONFIG", str(_tool_config(tmp_path, url)))
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert TOOL_URL_FIELD.search(str(refused.value)), str(refused.value)
    assert reason in str(refused.value)


@pytest.mark.parametrize(("url", "allow_private"), GOOD_TOOL_URLS)
def test_tool_urls_that_can_work_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, allow_private: bool
) -> None:
    monkeypatch.setenv("PACEMAKER_CONFIG", str(_tool_config(tmp_path, url, allow_private)))
    assert load_settings().tools.http[0].url == url


def _command(args: list[str], config: Path) -> tuple[int, str]:
    """Exit code and stderr of `pacemaker <args>`; a server that starts instead is stopped and fails the check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACEMAKER_")}
    env["PACEMAKER_CONFIG"] = str(config)
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return -1, "still running after 30 s"
    return process.returncode, stderr


# One URL of each kind for the commands themselves (every URL goes through load_settings above, as
# the commands do): a process each is about a second of CPU on a busy two-core machine.
COMMAND_TOOL_URLS = [
    "http://2130706433:8401/",
    "http://127.1:8401/",
    "http://0x7f.1:8401/",
    "http://127.0.0.01/",
    "http://user:secret@example.com/",
    "http://example.com/x#part",
    "http://example.com:99999/",
    "http://127.0.0.1:8401/",
]


def test_check_config_and_serve_exit_2_on_bad_tool_urls_and_accept_good_ones(tmp_path: Path) -> None:
    runs = [(url, command) for url in COMMAND_TOOL_URLS for command in ("check-config", "serve")]
    with ThreadPoolExecutor(4) as pool:
        refused = list(
            pool.map(
                lambda run: _command(
                    [run[1], *(["--port", str(free_port())] if run[1] == "serve" else [])],
                    _tool_config(tmp_path, run[0]),
                ),
                runs,
            )
        )
        accepted = list(
            pool.map(lambda good: _command(["check-config"], _tool_config(tmp_path, *good)), GOOD_TOOL_URLS[::3])
        )
    wrong = [
        f"{command} {url}: exit {code}, {stderr.strip()[-200:]!r}"
        for (url, command), (code, stderr) in zip(runs, refused, strict=True)
        if code != 2 or not TOOL_URL_FIELD.search(stderr) or "Traceback" in stderr
    ]
    assert not wrong, "\n".join(wrong)
    assert [code for code, _ in accepted] == [0] * len(GOOD_TOOL_URLS[::3]), accepted
