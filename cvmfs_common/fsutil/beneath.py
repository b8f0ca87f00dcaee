"""Writing and removing under a root without following a symlink planted inside it.

A path below the repository root is reached one component at a time from an fd of
the root, each with ``O_NOFOLLOW | O_DIRECTORY``: a symlink (or anything that is not
a directory) on the way raises ``NotBeneath`` instead of leading the write or the
removal elsewhere. The final component is then acted on relative to its parent's fd
(``*at`` calls), never by path. The root itself may be reached through symlinks (it
is configuration, not content).

    with parent_beneath(root, root / ".layers/ab/cdef", create=True) as (fd, name): ...
    write_file_beneath(root, path, data, tmp=root / ".tmp")
    symlink_beneath(root, "../target", link, tmp=root / ".tmp")
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cvmfs_common.fsutil.fdtree import DIR_FLAGS


class NotBeneath(OSError):
    """A component of the path below the root is a symlink or no directory."""


def _parts(root: Path, path: Path) -> list[str]:
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    parts = [] if rel == "." else rel.split(os.sep)
    if any(p in ("", ".", "..") for p in parts):
        raise NotBeneath(errno.EXDEV, "path is not below the root", str(path))
    return parts


def open_dir_beneath(root: Path, path: Path, *, create: bool = False, mode: int = 0o755) -> int:
    """An fd of directory ``path`` below ``root`` (``root`` itself allowed); missing
    components are made (``create``; the root too), a symlink or non-directory refused."""
    if create:
        Path(root).mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in _parts(root, path):
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotBeneath(e.errno, f"{part!r} is a symlink or no directory; not followed",
                                     str(path)) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def parent_beneath(root: Path, path: Path, *, create: bool = False) -> Iterator[tuple[int, str]]:
    """(fd of ``path``'s parent, ``path``'s name), the parent reached as above."""
    path = Path(os.path.normpath(path))
    if path == Path(os.path.normpath(root)):
        raise NotBeneath(errno.EXDEV, "the root itself has no parent below the root", str(path))
    fd = open_dir_beneath(root, path.parent, create=create)
    try:
        yield fd, path.name
    finally:
        os.close(fd)


def _temp_name(tmp_fd: int, stem: str, make) -> str:
    for _ in range(100):
        name = f".{stem[:100]}.{os.urandom(6).hex()}.tmp"
        try:
            make(name)
            return name
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "cannot create a temporary name", stem)  # pragma: no cover


def _replace_beneath(root: Path, path: Path, tmp: Path, make, before_rename=None, *, durable: bool = True) -> None:
    """Atomically put an entry at ``path`` (below ``root``): ``make(name, tmp_fd)`` creates it
    under a temp name in ``tmp`` (below ``root``, same file system), ``before_rename(parent_fd, name)``
    may fill it or refuse what is there now, then it is renamed over ``path`` fd-relative and the parent
    fsynced (``durable``); a failure leaves no temp entry behind."""
    tmp_fd = open_dir_beneath(root, tmp, create=True)
    try:
        with parent_beneath(root, path, create=True) as (parent_fd, name):
            tmp_name = _temp_name(tmp_fd, name, lambda n: make(n, tmp_fd))
            try:
                if before_rename is not None:
                    before_rename(parent_fd, name)
                os.rename(tmp_name, name, src_dir_fd=tmp_fd, dst_dir_fd=parent_fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name, dir_fd=tmp_fd)
                raise
            if durable:
                os.fsync(parent_fd)
    finally:
        os.close(tmp_fd)


def write_file_beneath(root: Path, path: Path, data: bytes, *, tmp: Path, mode: int = 0o644,
                       durable: bool = True) -> None:
    """Atomically replace file ``path`` (below ``root``) with ``data``: a temp file in
    ``tmp`` (below ``root``, same file system), fsynced, renamed over it fd-relative.
    ``durable`` False: no fsync of the file or its parent, for a writer whose work is made
    durable as a whole (a CernVM-FS transaction by its publish)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fds: list[int] = []

    def fill(_parent_fd: int, _name: str) -> None:  # inside the clean-up's reach
        with os.fdopen(fds[0], "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())

    _replace_beneath(root, path, tmp, lambda name, tmp_fd: fds.append(os.open(name, flags, 0o600, dir_fd=tmp_fd)),
                     fill, durable=durable)


def symlink_beneath(root: Path, target: str, link: Path, *, tmp: Path, durable: bool = True) -> None:
    """Create or atomically replace symlink ``link`` (below ``root``) -> ``target``;
    a real directory there is refused (IsADirectoryError). ``durable``: as write_file_beneath."""
    if not target or "\x00" in target:
        raise ValueError(f"invalid symlink target: {target!r}")

    def no_dir(parent_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "refusing to replace a directory with a symlink", str(link))

    _replace_beneath(root, link, tmp, lambda name, tmp_fd: os.symlink(target, name, dir_fd=tmp_fd), no_dir,
                     durable=durable)
