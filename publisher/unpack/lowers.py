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
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.fsutil.fdtree import open_dir_at, proc_path

from publisher.unpack.whiteouts import OPAQUE, OPAQUE_XATTR, OVERLAY_XATTR_PREFIXES, PREFIX, is_whiteout_device


@dataclass(frozen=True)
class LowerEntry:
    """The entry overlay would show, read while its directory was open: its lstat, its
    xattrs (minus overlay's own: an opaque flag must not travel) and, for a symlink,
    its target. ``path`` names it for messages only: past PATH_MAX it cannot be used."""
    path: Path
    st: os.stat_result
    xattr_values: dict[str, bytes] = field(default_factory=dict)
    link_target: str | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)

    def xattrs(self) -> dict[str, bytes]:
        return dict(self.xattr_values)


def read_xattrs(path: Path | str | int, skip_overlay: bool) -> dict[str, bytes]:
    """xattrs of a path (not followed) or of an open fd."""
    nofollow = {} if isinstance(path, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(path, **nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if skip_overlay and name.startswith(OVERLAY_XATTR_PREFIXES):
            continue
        try:
            out[name] = os.getxattr(path, name, **nofollow)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return out


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_opaque(fd: int) -> bool:
    try:
        if os.getxattr(fd, OPAQUE_XATTR) == b"y":
            return True
    except OSError:
        pass
    return _lstat_at(fd, OPAQUE) is not None


def _entry_at(dir_fd: int, name: str, st: os.stat_result, path: Path) -> LowerEntry:
    """A non-directory entry (directories are read through their own fd)."""
    target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
    return LowerEntry(path, st, read_xattrs(proc_path(dir_fd, name), skip_overlay=True), target)


def _dir_entry(fd: int, path: Path) -> LowerEntry:
    return LowerEntry(path, os.fstat(fd), read_xattrs(fd, skip_overlay=True))


class LowerView:
    """Overlay lookup over lower dirs given topmost first (fd-relative: any depth).

    The directories merged at the last directory found stay open (``forget`` closes
    them): a lookup one component below it continues from there, so walking down a
    path that a layer omits costs one step per level, not the whole path again. Call
    ``forget`` whenever the lowers may have changed since (the writer's own tree is
    one of them)."""

    def __init__(self, lowers_top_first: Sequence[os.PathLike[str] | str]) -> None:
        self._lowers = tuple(Path(p) for p in lowers_top_first)
        self._memo: tuple[tuple[str, ...], list[int]] | None = None

    @property
    def dirs(self) -> tuple[Path, ...]:
        return self._lowers

    def __bool__(self) -> bool:
        return bool(self._lowers)

    def forget(self) -> None:
        if self._memo is not None:
            _close(self._memo[1])
            self._memo = None

    def lookup(self, parts: Sequence[str]) -> LowerEntry | None:
        """The entry overlay would show at `parts` (() is the root), or None."""
        parts = tuple(parts)
        dirs: list[int] = []                    # open lower dirs still merged at this prefix
        try:
            memo = self._memo
            if memo is not None and len(parts) == len(memo[0]) + 1 and parts[:-1] == memo[0]:
                self._memo = None
                dirs, start = memo[1], len(parts) - 1
            else:
                self.forget()
                start = 0
                for d in self._lowers:
                    try:
                        fd = open_dir_at(None, d)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            raise
                        continue
                    if not parts:
                        try:
                            return _dir_entry(fd, d)
                        finally:
                            os.close(fd)
                    dirs.append(fd)
            where = Path(*parts) if parts else Path(".")
            for depth in range(start, len(parts)):
                last = depth == len(parts) - 1
                merged: list[int] = []
                try:
                    found, done = _step(dirs, merged, parts[depth], last, where)
                except BaseException:
                    _close(merged)
                    raise
                finally:
                    _close(dirs)                # one level of fds open at a time
                    dirs = []
                if done:
                    if found is not None and found.is_dir and merged:
                        self._memo = (parts, merged)
                    else:
                        _close(merged)
                    return found
                dirs = merged
            return None
        finally:
            _close(dirs)


def _close(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _step(dirs: list[int], merged: list[int], comp: str, last: bool,
          where: Path) -> tuple[LowerEntry | None, bool]:
    """One component down: fills ``merged`` with the directories that continue the
    merge; (entry, True) when the lookup ends here."""
    for d in dirs:
        if _lstat_at(d, PREFIX + comp) is not None:
            break                               # raw whiteout hides this and below
        st = _lstat_at(d, comp)
        if st is None:
            continue
        if is_whiteout_device(st):
            break
        if not stat.S_ISDIR(st.st_mode):
            if not merged:                      # topmost is a non-directory: it wins
                return (_entry_at(d, comp, st, where) if last else None), True
            break                               # a non-dir below a dir ends the merge
        merged.append(open_dir_at(d, comp))
        if _is_opaque(merged[-1]):
            break
    if not merged:
        return None, True
    if last:
        return _dir_entry(merged[0], where), True
    return None, False
