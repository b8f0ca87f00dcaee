"""Atomic file-system steps: renameat2 publish/exchange, syncfs, temp-file writes and symlinks,
tree removal and the work-dir cleanup."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cvmfs_common.fsutil import fdtree
from cvmfs_common.fsutil.beneath import parent_beneath


_RENAME_NOREPLACE = 1


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    # once per process: find_library runs `ldconfig -p` (a fork and exec) on every call
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _renameat2(src: Path | str, dst: Path | str, flags: int, src_fd: int = _AT_FDCWD, dst_fd: int = _AT_FDCWD) -> None:
    libc = _libc()
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole file system holding ``path`` (cheaper than fsync per file
    after unpacking a layer). Falls back to sync() where syncfs is missing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fn = _libc().syncfs
        except AttributeError:
            os.sync()
            return
        fn.argtypes = [ctypes.c_int]
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def publish_dir(src: Path, dst: Path, root: Path | None = None, durable: bool = True) -> bool:
    """Rename a finished work dir into place, never replacing an existing ``dst``.

    Uses renameat2(RENAME_NOREPLACE) (plain rename() would silently replace an
    EMPTY directory). Returns False (and leaves ``src``) when ``dst`` exists --
    someone published the same content first, which is fine for content-addressed
    dirs. Parent directories of ``dst`` are created; the parent is fsynced.
    ``root``: both are below it and reached without following a symlink (beneath.py).
    ``durable=False``: no fsync of the parent (the caller's file system makes it durable otherwise).
    """
    src, dst = Path(src), Path(dst)
    if root is not None:
        with parent_beneath(root, src) as (src_fd, src_name), \
                parent_beneath(root, dst, create=True) as (dst_fd, dst_name):
            try:
                _renameat2(src_name, dst_name, _RENAME_NOREPLACE, src_fd, dst_fd)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    return False
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                if lexists_at(dst_fd, dst_name):
                    return False
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            if durable:
                os.fsync(dst_fd)
        return True
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # File system without RENAME_NOREPLACE: check, then rename (racy only
        # against another writer, which the publisher's own locking excludes).
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
    if durable:
        fsync_dir(dst.parent)
    return True


def lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _exchange_beneath(root: Path, new: Path, current: Path) -> None:
    with parent_beneath(root, new) as (new_fd, new_name), \
            parent_beneath(root, current, create=True) as (cur_fd, cur_name):
        if not lexists_at(cur_fd, cur_name) and publish_dir(new, current, root):
            return
        try:
            _renameat2(new_name, cur_name, _RENAME_EXCHANGE, new_fd, cur_fd)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            fdtree.remove_tree_at(cur_fd, cur_name)  # (an overlay union: see exchange_dirs)
            os.rename(new_name, cur_name, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
        os.fsync(cur_fd)
        os.fsync(new_fd)


def exchange_dirs(new: Path, current: Path, root: Path | None = None) -> None:
    """Atomically swap ``new`` into ``current``'s place (renameat2 RENAME_EXCHANGE).

    Afterwards ``new`` holds the OLD content: the caller removes it. Readers
    see either the old or the new directory, never a missing one. If
    ``current`` does not exist this is a plain NOREPLACE publish. ``root``: as for
    publish_dir.
    """
    new, current = Path(new), Path(current)
    if root is not None:
        _exchange_beneath(root, new, current)
        return
    if not os.path.lexists(current):
        if publish_dir(new, current):
            return
    try:
        _renameat2(new, current, _RENAME_EXCHANGE)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # An overlay union (a cvmfs_server transaction) refuses to rename a directory
        # that comes from its lower layer (verified with CernVM-FS 2.12). There the
        # transaction is the atomic unit (clients see only published revisions), so
        # replace it in two steps; ``new`` is gone afterwards.
        remove_tree(current)
        os.rename(new, current)
    fsync_dir(current.parent)
    if current.parent != new.parent:
        fsync_dir(new.parent)


def atomic_write_file(path: Path, data: bytes, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to a temp file, fsync, rename over ``path``, fsync the dir.

    The temp file lives in ``tmp_dir`` (the layout passes its ``.tmp/``, so a
    crash leaves nothing in visible dirs) or next to ``path``; it must be on the
    same file system as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(path, tmp_dir) as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)
    fsync_dir(path.parent)


@contextlib.contextmanager
def replacing_file(path: Path, tmp_dir: Path | None = None, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A temp file (mode 0600; in ``tmp_dir`` or next to ``path``, same file system) that
    is fsynced and renamed over ``path`` when the block ends normally, and removed on any
    error, leaving ``path`` untouched. The caller fsyncs the directory if it needs to."""
    where = Path(tmp_dir) if tmp_dir is not None else path.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=where)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_symlink(target_rel: str, link_path: Path, tmp_dir: Path | None = None) -> None:
    """Create or replace ``link_path`` -> ``target_rel`` atomically.

    A temp symlink (in ``tmp_dir`` or next to the link; same file system) is
    renamed over the old link, so readers see the old or the new target, never
    none. Refuses to replace a real directory.
    """
    link_path = Path(link_path)
    if not target_rel or "\x00" in target_rel:
        raise ValueError(f"invalid symlink target: {target_rel!r}")
    link_path.parent.mkdir(parents=True, exist_ok=True)
    where = Path(tmp_dir) if tmp_dir is not None else link_path.parent
    where.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = where / f".{link_path.name}.{os.urandom(6).hex()}.tmp"
        try:
            os.symlink(target_rel, tmp)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise OSError(errno.EEXIST, "cannot create temporary symlink", str(link_path))
    try:
        if os.path.isdir(link_path) and not os.path.islink(link_path):
            raise IsADirectoryError(errno.EISDIR, "refusing to replace a directory with a symlink", str(link_path))
        os.replace(tmp, link_path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(link_path.parent)


def relative_link_target(from_link: Path, to_path: Path) -> str:
    """Target for a symlink at ``from_link`` pointing at ``to_path`` (relative, so
    the repository works wherever it is mounted)."""
    return os.path.relpath(os.path.abspath(to_path), os.path.dirname(os.path.abspath(from_link)))


def remove_tree(path: Path) -> None:
    """rm -rf that copes with read-only directories, never follows symlinks and
    works at any depth (fd-relative and iterative: cvmfs_common.fsutil.fdtree)."""
    fdtree.remove_tree(path)


def clean_tmp(tmp_dir: Path) -> int:
    """Remove every entry under ``tmp_dir`` (work left by a crash); returns the count."""
    try:
        fd = fdtree.open_dir_at(None, tmp_dir)
    except FileNotFoundError:
        return 0
    try:
        names = os.listdir(fd)
        for name in names:
            fdtree.remove_tree_at(fd, name)
    finally:
        os.close(fd)
    return len(names)
