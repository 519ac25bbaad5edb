"""The lock files, made from pyproject.toml by `make lock`, installed with pip's --require-hashes.

- requirements.lock: the dependencies, what the Docker image installs;
- requirements-dev.lock: those plus every extra (dev, load, ...), what `make install` (so `make
  test` and CI) installs. The same versions as requirements.lock for what both hold: the runtime
  lock is resolved within the dev one.

Both are universal (every platform and Python >= 3.11, by markers), hold a hash of every file of
each pinned version, and also pin pip and the build backend (setuptools), so that nothing is
installed unpinned: the project itself is installed with --no-deps --no-build-isolation. Each
starts with a digest of what it was made from (pyproject's dependencies, extras, requires-python
and build requirements); `check` fails when pyproject.toml says otherwise now.

    python3 deploy/lock.py check [LOCK ...]            # before installing: make install, the Dockerfile
    python3 deploy/lock.py compile --uv PATH [OPTION ...]  # make lock; options go to `uv pip compile`,
                                                       # e.g. --upgrade-package httpx, or --upgrade

Standard library only: `check` runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
DIGEST_PREFIX = "# pyproject.toml digest: "
# The oldest Python the project supports: markers cover it and everything newer.
PYTHON_VERSION = "3.11"


def digest(pyproject: Path = PYPROJECT) -> str:
    """A hash of what decides the locks' content, and nothing else (a ruff setting changes nothing)."""
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    inputs = {
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "requires-python": project.get("requires-python"),
        "build-system": data.get("build-system", {}).get("requires", []),
    }
    return "sha256:" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    if not lock.is_file():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line.removeprefix(DIGEST_PREFIX).split()[0]
    return None


def stale(locks: list[Path], pyproject: Path = PYPROJECT) -> list[str]:
    """What is wrong, one line per lock file: nothing when every lock was made from this pyproject."""
    expected = digest(pyproject)
    problems = []
    for lock in locks:
        recorded = recorded_digest(lock)
        if recorded is None:
            problems.append(f"{lock.name} is missing or has no digest line")
        elif recorded != expected:
            problems.append(f"{lock.name} was made from other dependencies than pyproject.toml lists now")
    return problems


def _check(args: argparse.Namespace) -> int:
    locks = [Path(name) for name in args.locks] or [RUNTIME_LOCK, DEV_LOCK]
    problems = stale(locks)
    for problem in problems:
        sys.stderr.write(f"error: {problem}\n")
    if problems:
        sys.stderr.write(
            "Run `make lock` and commit the lock files: installs take only what they pin, so a dependency"
            " added to pyproject.toml without them would be missing (see README: upgrading a dependency).\n"
        )
        return 1
    return 0


def _compile(args: argparse.Namespace, uv_options: list[str]) -> int:
    pyproject = Path(args.pyproject).resolve()
    build = tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", [])
    # Read on stdin with the project: the build backend and pip are pinned like everything else.
    tools = "\n".join([*build, "pip"]) + "\n"
    uv = str(Path(shutil.which(args.uv) or args.uv).resolve())  # uv runs from pyproject's folder
    common = [
        uv, "pip", "compile", pyproject.name, "-",
        "--universal", "--python-version", PYTHON_VERSION, "--generate-hashes",
        "--custom-compile-command", "make lock", "--quiet",
    ]  # fmt: skip
    runs = [
        # The dev lock first, with every extra; then the runtime lock within its versions.
        [*common, "--all-extras", "--output-file", str(DEV_LOCK), *uv_options],
        [*common, "--constraint", str(DEV_LOCK), "--output-file", str(RUNTIME_LOCK)],
    ]
    for command in runs:
        # From pyproject's folder, so that the annotations say "(pyproject.toml)", never a path.
        done = subprocess.run(command, input=tools, text=True, cwd=pyproject.parent, check=False)  # noqa: S603
        if done.returncode != 0:
            return done.returncode
    stamp = f"{DIGEST_PREFIX}{digest(pyproject)} (made by `make lock`, checked by `make install` and the Dockerfile)\n"
    for lock in (DEV_LOCK, RUNTIME_LOCK):
        text = lock.read_text().replace(str(DEV_LOCK), DEV_LOCK.name)  # uv's "via -c <absolute path>"
        lines = [line for line in text.splitlines(keepends=True) if not line.startswith(DIGEST_PREFIX)]
        lock.write_text(stamp + "".join(lines))
        sys.stdout.write(f"wrote {lock.name}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/lock.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="exit 1 when a lock file is not made from pyproject.toml as it is")
    check.add_argument("locks", nargs="*", help="default: requirements.lock requirements-dev.lock")
    compile_ = commands.add_parser("compile", help="make both lock files with uv")
    compile_.add_argument("--uv", required=True, help="the uv executable")
    compile_.add_argument("--pyproject", default=str(PYPROJECT), help="default: the project's own")
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _check(args)
    return _compile(args, rest)


if __name__ == "__main__":
    sys.exit(main())
