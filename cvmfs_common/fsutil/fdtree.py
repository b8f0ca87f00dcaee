"""Walking and removing directory trees of any depth: fd-relative, no recursion.

Container layers may nest thousands of directories: deeper than Python's recursion
limit (shutil.rmtree, os.walk's callers) and than PATH_MAX (absolute paths fail
with ENAMETOOLONG beyond ~2 000 levels). Everything here holds one directory fd
per tree and moves with ``openat(name)`` / ``openat("..")``; going up checks that
".." is the directory we came from (device and inode), so a tree renamed under
our feet raises instead of walking somewhere else. Nothing follows a symlink.

    remove_tree(path)                 # rm -rf, making read-only dirs writable
    remove_tree_at(dir_fd, name)      # the same below an open directory
    for st in lstat_tree(path): ...   # every entry's lstat, the top included
    cur = DirCursor.open(path); cur.down("a"); cur.up(); cur.fd
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_at(dir_fd: int | None, name: str | os.PathLike[str]) -> int:
    """fd of directory ``name`` (relative to ``dir_fd``; None: the cwd/absolute)."""
    if dir_fd is None:
        return os.open(name, DIR_FLAGS)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def proc_path(dir_fd: int, name: str) -> str:
    """A short path naming ``name`` in ``dir_fd`` for calls without a dir_fd variant
    (xattrs): /proc/self/fd/N is the directory itself, whatever its depth."""
    return f"/proc/self/fd/{dir_fd}/{name}"


class TreeMoved(OSError):
    """'..' is not the directory the walk came from: someone moved the tree."""


@dataclass
class DirCursor:
    """One open directory of a tree that moves down and up by name.

    ``down`` of a name that is not a directory (or is missing) leaves the cursor
    *absent* below that point: further ``down``/``up`` only count until it is back
    where the tree exists (the chain merger walks a lower tree that stops early).
    """

    fd: int | None
    _ids: list[tuple[int, int]] = field(default_factory=list)  # (dev, ino) of each dir on the path
    _absent: int = 0  # levels below the last existing directory

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> "DirCursor":
        if path is None:
            return cls(None)
        fd = open_dir_at(None, path)
        st = os.fstat(fd)
        return cls(fd, [(st.st_dev, st.st_ino)])

    @classmethod
    def at(cls, dir_fd: int, name: str) -> "DirCursor":
        fd = open_dir_at(dir_fd, name)
        st = os.fstat(fd)
        return cls(fd, [(st.st_dev, st.st_ino)])

    @property
    def present(self) -> bool:
        return self.fd is not None and not self._absent

    def down(self, name: str | None) -> bool:
        """Enter ``name`` (None: enter nothing, the cursor becomes absent). True when
        the cursor is on an existing directory afterwards."""
        if not self.present or name is None:
            self._absent += 1
            return False
        assert self.fd is not None
        try:
            child = open_dir_at(self.fd, name)
        except (FileNotFoundError, NotADirectoryError):
            self._absent += 1
            return False
        except OSError as e:
            if e.errno != errno.ELOOP:  # a symlink: not a directory of this tree
                raise
            self._absent += 1
            return False
        st = os.fstat(child)
        os.close(self.fd)
        self.fd = child
        self._ids.append((st.st_dev, st.st_ino))
        return True

    def up(self) -> None:
        if self._absent:
            self._absent -= 1
            return
        if self.fd is None:
            return
        if len(self._ids) < 2:
            raise ValueError("already at the top of the tree")
        parent = open_dir_at(self.fd, "..")
        st = os.fstat(parent)
        self._ids.pop()
        if (st.st_dev, st.st_ino) != self._ids[-1]:
            os.close(parent)
            raise TreeMoved(errno.ESTALE, "directory moved during the walk")
        os.close(self.fd)
        self.fd = parent

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "DirCursor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _entries(fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory) of every entry (d_type, lstat where it is unknown)."""
    out = []
    with os.scandir(fd) as it:
        for e in it:
            out.append((e.name, e.is_dir(follow_symlinks=False)))
    return out


def _writable(fd: int) -> bool:
    """Make the directory ``fd`` writable and searchable by us; False if it already was
    (or cannot be made so): then retrying is pointless."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_IMODE(mode) & stat.S_IRWXU == stat.S_IRWXU:
            return False
        os.fchmod(fd, stat.S_IMODE(mode) | stat.S_IRWXU)
        return True
    except OSError:
        return False


def _retrying(fd: int, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except PermissionError:
        if not _writable(fd):
            raise
        return fn(*args, **kw)


def _open_subdir(fd: int, name: str) -> int:
    """Open a subdirectory to empty it; an unreadable one (mode 0) is chmodded first."""
    try:
        return _retrying(fd, open_dir_at, fd, name)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=fd)  # lstat said directory; follow_symlinks needs no flag
        return open_dir_at(fd, name)


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and everything below it (missing: nothing to do)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _retrying(dir_fd, os.unlink, name, dir_fd=dir_fd)
        return
    fd = _open_subdir(dir_fd, name)
    # One frame per level on the path: (name in its parent, (dev, ino), subdirs left).
    top = os.fstat(fd)
    frames: list[tuple[str, tuple[int, int], list[str]]] = [(name, (top.st_dev, top.st_ino), [])]
    try:
        pending: list[str] | None = None
        while True:
            if pending is None:
                pending = []
                for child, is_dir in _entries(fd):
                    if is_dir:
                        pending.append(child)
                    else:
                        try:
                            _retrying(fd, os.unlink, child, dir_fd=fd)
                        except FileNotFoundError:
                            pass
                frames[-1] = (frames[-1][0], frames[-1][1], pending)
            if pending:
                child = pending.pop()
                try:
                    sub = _open_subdir(fd, child)
                except FileNotFoundError:
                    continue
                except NotADirectoryError:
                    _retrying(fd, os.unlink, child, dir_fd=fd)
                    continue
                sst = os.fstat(sub)
                os.close(fd)
                fd = sub
                frames.append((child, (sst.st_dev, sst.st_ino), []))
                pending = None
                continue
            # This directory is empty: leave it and remove it.
            done, _, _ = frames.pop()
            if not frames:
                break
            parent = open_dir_at(fd, "..")
            pst = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (pst.st_dev, pst.st_ino) != frames[-1][1]:
                raise TreeMoved(errno.ESTALE, f"directory moved while removing it: {name}")
            _retrying(fd, os.rmdir, done, dir_fd=fd)
            pending = frames[-1][2]
    finally:
        os.close(fd)
    try:
        _retrying(dir_fd, os.rmdir, name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def remove_tree(path: str | os.PathLike[str]) -> None:
    """``rm -rf path`` of any depth; never follows symlinks (a symlink is unlinked);
    read-only directories are made writable first; a missing path is fine."""
    path = Path(os.path.abspath(path))
    try:
        parent = open_dir_at(None, path.parent)
    except FileNotFoundError:
        return
    try:
        remove_tree_at(parent, path.name)
    finally:
        os.close(parent)


def lstat_tree(path: str | os.PathLike[str]) -> Iterator[os.stat_result]:
    """lstat of ``path`` and of every entry below it (any depth; unreadable dirs are
    skipped; a missing path yields nothing)."""
    path = os.fspath(path)
    try:
        parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        yield from lstat_tree_at(parent, os.path.basename(os.path.abspath(path)))
    finally:
        os.close(parent)


def lstat_tree_at(dir_fd: int, name: str) -> Iterator[os.stat_result]:
    """lstat_tree of ``name`` in the directory ``dir_fd``: ``name`` and everything below
    it reached relative to fds, a symlink never followed (not even ``name`` itself)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    yield st
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        cur = DirCursor.at(dir_fd, name)
    except OSError:
        return
    with cur:
        stack: list[list[str]] = [[]]
        first = True
        while stack:
            if first:
                first = False
                subdirs: list[str] = []
                assert cur.fd is not None
                try:
                    names = [n for n, _ in _entries(cur.fd)]
                except OSError:
                    names = []
                for n in names:
                    try:
                        est = os.stat(n, dir_fd=cur.fd, follow_symlinks=False)
                    except OSError:
                        continue
                    yield est
                    if stat.S_ISDIR(est.st_mode):
                        subdirs.append(n)
                stack[-1] = subdirs
            if stack[-1]:
                child = stack[-1].pop()
                try:
                    entered = cur.down(child)
                except OSError:  # unreadable: skipped
                    continue
                if entered:
                    stack.append([])
                    first = True
                else:
                    cur.up()
                continue
            stack.pop()
            if stack:
                cur.up()


__all__ = ["DIR_FLAGS", "DirCursor", "TreeMoved", "lstat_tree", "lstat_tree_at", "open_dir_at", "proc_path", "remove_tree",
           "remove_tree_at"]
