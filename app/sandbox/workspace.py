"""Session workspaces: measure one without following links, and undo a run that made it too large."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

# Every entry costs at least a block, so a million empty files are not free.
ENTRY_COST = 4096

Snapshot = dict[str, tuple[int, int]]  # relative path -> (inode, ctime_ns)


def scan(root: Path) -> tuple[Snapshot, int]:
    """Every entry under root (never following symlinks) and the bytes they count for."""
    entries: Snapshot = {}
    total = 0
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            entries[os.path.relpath(path, root)] = (info.st_ino, info.st_ctime_ns)
            total += max(info.st_size, ENTRY_COST) if stat.S_ISREG(info.st_mode) else ENTRY_COST
    return entries, total


def roll_back(root: Path, before: Snapshot) -> None:
    """Remove every entry this run created or changed, keeping what was there and untouched before.

    ctime (unlike mtime) cannot be set by the guest, so a file rewritten in place cannot pass as
    unchanged. A changed file is removed, not restored: the run's writes are never kept in part.
    What remains is a subset of the previous state, which was within the cap.
    """
    after, _ = scan(root)
    removed_dirs: list[str] = []
    # Parents before children, so a removed directory's contents are skipped.
    for relative in sorted(after, key=lambda rel: rel.count(os.sep)):
        if after[relative] == before.get(relative) or any(relative.startswith(gone + os.sep) for gone in removed_dirs):
            continue
        path = root / relative
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            if relative in before and before[relative][0] == info.st_ino:
                continue  # an old directory whose listing changed: only its changed entries go
            shutil.rmtree(path)  # safe against symlinks: it never follows them
            removed_dirs.append(relative)
        else:
            path.unlink()  # unlinks the link itself, never its target
