"""Lookups that treat a missing entry as empty: readlink or None, scandir or []."""

from __future__ import annotations

import os
from pathlib import Path


def readlink(path: Path) -> str | None:
    """The link's target; None when ``path`` is missing or not a symlink."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def scandir(path: Path) -> list[os.DirEntry]:
    """The directory's entries; [] when ``path`` is missing or not a directory."""
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
