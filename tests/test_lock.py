"""The lock files (deploy/lock.py): made from pyproject.toml as it is, hash-pinned, the runtime lock
within the dev lock's versions, and a stale lock refused with what to run."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.support import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)")


def _lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_lock", ROOT / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(lock: Path) -> dict[str, str]:
    """name -> version of every requirement; each must be pinned with == and carry hashes."""
    pins: dict[str, str] = {}
    requirement: list[str] = []
    for line in [*lock.read_text().splitlines(), ""]:
        if line.startswith((" ", "#")) and requirement:
            if line.strip().startswith("--hash=sha256:"):
                requirement.append(line)
            continue
        if requirement:
            match = PIN.match(requirement[0])
            assert match, f"{lock.name}: not pinned with ==: {requirement[0]}"
            assert len(requirement) > 1, f"{lock.name}: no hash for {requirement[0]}"
            pins[match.group(1).lower()] = match.group(2)
        requirement = [line] if line and not line.startswith(("#", " ")) else []
    return pins


def test_the_locks_are_made_from_pyproject_as_it_is() -> None:
    lock = _lock_module()
    assert lock.stale([ROOT / "requirements.lock", ROOT / "requirements-dev.lock"]) == [], "run `make lock`"


def test_every_requirement_is_pinned_with_hashes_and_the_runtime_within_the_dev_lock() -> None:
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert {"fastapi", "uvicorn", "sqlalchemy", "pip", "setuptools"} <= runtime.keys()
    # What make test and CI need, installed from the lock: the dev and load extras, pip and the build backend.
    assert {"pytest", "mypy", "locust", "kubernetes-validate", "pip", "setuptools"} <= dev.keys()
    assert "locust" not in runtime and "pytest" not in runtime  # the image gets no test tools
    different = {name: (version, dev.get(name)) for name, version in runtime.items() if dev.get(name) != version}
    assert different == {}, "the image would run other versions than the tests: run `make lock`"


def test_a_dependency_change_makes_the_locks_stale_and_other_settings_do_not(tmp_path: Path) -> None:
    lock = _lock_module()
    locks = [ROOT / "requirements.lock", ROOT / "requirements-dev.lock"]
    original = (ROOT / "pyproject.toml").read_text()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(original.replace("line-length = 120", "line-length = 100"))
    assert lock.stale(locks, pyproject) == []
    for changed in (
        original.replace("dependencies = [\n", 'dependencies = [\n  "leftpad>=1",\n', 1),
        original.replace('load = ["locust>=2.20"]', 'load = ["locust>=2.30"]'),
        original.replace('requires = ["setuptools>=68"]', 'requires = ["setuptools>=70"]'),
    ):
        assert changed != original
        pyproject.write_text(changed)
        assert len(lock.stale(locks, pyproject)) == 2


def test_make_install_check_names_the_command_to_run(tmp_path: Path) -> None:
    # The check as make install and the Dockerfile run it, in a copy of the project with one more dependency.
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "lock.py", tmp_path / "deploy" / "lock.py")
    for name in ("requirements.lock", "requirements-dev.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    original = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(original)
    command = [sys.executable, "deploy/lock.py", "check", "requirements-dev.lock"]
    assert subprocess.run(command, cwd=tmp_path, capture_output=True, check=False).returncode == 0
    one_more = original.replace("dependencies = [\n", 'dependencies = [\n  "leftpad",\n', 1)
    (tmp_path / "pyproject.toml").write_text(one_more)
    stale = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert stale.returncode == 1
    assert "requirements-dev.lock was made from other dependencies" in stale.stderr
    assert "Run `make lock`" in stale.stderr
