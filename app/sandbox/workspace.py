"""Guest-made trees on the host: measure a workspace, undo a run that made it too large, remove a workdir."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

# Every entry costs at least a block, so a million empty files are not free.
ENTRY_COST = 4096

Snapshot = dict[str, tuple[int, int]]  # relative path -> (inode, ctime_ns)

# A guest may nest directories deeper than Python's recursion limit (os.walk and shutil.rmtree
# recurse here) and than PATH_MAX (it creates each level relative to the last), so every walk is
# iterative and works relative to one open directory at a time, climbing back through "..".
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# visit(relative path, the parent's descriptor, name, lstat) -> whether to descend into it.
Visit = Callable[[str, int, str, os.stat_result], bool]
# leave(the parent's descriptor, name) once a directory's entries are all visited.
Leave = Callable[[int, str], None]


def scan(root: Path) -> tuple[Snapshot, int]:
    """Every entry under root (never following symlinks) and the bytes they count for."""
    entries: Snapshot = {}
    total = 0

    def visit(relative: str, _parent: int, _name: str, info: os.stat_result) -> bool:
        nonlocal total
        entries[relative] = (info.st_ino, info.st_ctime_ns)
        total += max(info.st_size, ENTRY_COST) if stat.S_ISREG(info.st_mode) else ENTRY_COST
        return True

    _walk(os.open(root, _DIRECTORY), visit)
    return entries, total


def roll_back(root: Path, before: Snapshot) -> None:
    """Remove every entry this run created or changed, keeping what was there and untouched before.

    ctime (unlike mtime) cannot be set by the guest, so a file rewritten in place cannot pass as
    unchanged. A changed file is removed, not restored: the run's writes are never kept in part.
    What remains is a subset of the previous state, which was within the cap.
    """

    def visit(relative: str, parent: int, name: str, info: os.stat_result) -> bool:
        if (info.st_ino, info.st_ctime_ns) == before.get(relative):
            return True  # untouched; a directory may still hold changed entries
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(name, dir_fd=parent)  # the link itself, never its target
            return False
        if relative in before and before[relative][0] == info.st_ino:
            return True  # an old directory whose listing changed: only its changed entries go
        _remove_at(parent, name)
        return False

    _walk(os.open(root, _DIRECTORY), visit)


def remove_tree(root: Path) -> None:
    """Remove root and everything under it, never following a symlink out."""
    parent = os.open(root.parent, _DIRECTORY)
    try:
        _remove_at(parent, root.name)
    finally:
        os.close(parent)


def _remove_at(parent: int, name: str) -> None:
    def visit(_relative: str, directory: int, entry: str, info: os.stat_result) -> bool:
        if stat.S_ISDIR(info.st_mode):
            return True
        os.unlink(entry, dir_fd=directory)
        return False

    def leave(directory: int, entry: str) -> None:
        os.rmdir(entry, dir_fd=directory)

    _walk(os.open(name, _DIRECTORY, dir_fd=parent), visit, leave)
    os.rmdir(name, dir_fd=parent)


def _walk(start: int, visit: Visit, leave: Leave | None = None) -> None:
    """Visit everything under the directory open as `start` (which this closes), parents first."""
    current = start
    # For each directory above the current one: its path prefix, the names left to visit, and the
    # name of the child we went into.
    above: list[tuple[str, Iterator[str], str]] = []
    prefix, names = "", iter(os.listdir(current))
    try:
        while True:
            for name in names:
                try:
                    info = os.lstat(name, dir_fd=current)
                except FileNotFoundError:
                    continue
                if visit(prefix + name, current, name, info) and stat.S_ISDIR(info.st_mode):
                    child = os.open(name, _DIRECTORY, dir_fd=current)
                    os.close(current)
                    current = child
                    above.append((prefix, names, name))
                    prefix, names = f"{prefix}{name}{os.sep}", iter(os.listdir(current))
                    break
            else:
                if not above:
                    return
                parent = os.open("..", _DIRECTORY, dir_fd=current)
                os.close(current)
                current = parent
                prefix, names, child_name = above.pop()
                if leave is not None:
                    leave(current, child_name)
    finally:
        os.close(current)
