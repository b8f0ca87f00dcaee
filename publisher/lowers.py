"""What a stack of lower directories shows at one path, as overlayfs would merge them.

Used to give directories a layer omits the attributes they have in the parent chain. The
lowers are either one full root fs (a `.chains/...` dir) or layer dirs, topmost first, with
whiteouts in either form (char device 0:0 / opaque xattr, or raw `.wh.` files). Nothing is
followed: every component is lstat'ed and only real directories are descended into.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .whiteouts import OPAQUE, OPAQUE_XATTR, OVERLAY_XATTR_PREFIXES, PREFIX, is_whiteout_device


@dataclass(frozen=True)
class LowerEntry:
    path: Path               # the real path in the lower dir that provides the entry
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)

    def xattrs(self) -> dict[str, bytes]:
        """Its extended attributes minus overlay's own (an opaque flag must not travel)."""
        return read_xattrs(self.path, skip_overlay=True)


def read_xattrs(path: Path, skip_overlay: bool) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if skip_overlay and name.startswith(OVERLAY_XATTR_PREFIXES):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return out


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _is_opaque(path: Path) -> bool:
    try:
        if os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y":
            return True
    except OSError:
        pass
    return os.path.lexists(path / OPAQUE)


class LowerView:
    """Overlay lookup over lower dirs given topmost first."""

    def __init__(self, lowers_top_first: Sequence[os.PathLike[str] | str]) -> None:
        self._lowers = tuple(Path(p) for p in lowers_top_first)

    @property
    def dirs(self) -> tuple[Path, ...]:
        return self._lowers

    def __bool__(self) -> bool:
        return bool(self._lowers)

    def lookup(self, parts: Sequence[str]) -> LowerEntry | None:
        """The entry overlay would show at `parts` (() is the root), or None."""
        dirs = list(self._lowers)               # lower dirs still merged at this prefix
        if not parts:
            for d in dirs:
                st = _lstat(d)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    return LowerEntry(d, st)
            return None
        for depth, comp in enumerate(parts):
            last = depth == len(parts) - 1
            merged: list[Path] = []
            for d in dirs:
                if os.path.lexists(d / (PREFIX + comp)):
                    break                           # raw whiteout hides this and below
                path = d / comp
                st = _lstat(path)
                if st is None:
                    continue
                if is_whiteout_device(st):
                    break
                if not stat.S_ISDIR(st.st_mode):
                    if not merged:                  # topmost is a non-directory: it wins
                        return LowerEntry(path, st) if last else None
                    break                           # a non-dir below a dir ends the merge
                merged.append(path)
                if _is_opaque(path):
                    break
            if not merged:
                return None
            if last:
                return LowerEntry(merged[0], os.lstat(merged[0]))
            dirs = merged
        return None

