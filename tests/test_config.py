"""Settings: defaults, YAML file, environment, and refusals that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, load_settings
from tests.support import ROOT


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
