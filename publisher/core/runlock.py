"""One publisher per state and one writer per repository at a time.

Two locks, both flock (released by the kernel when the process dies, so a kill -9
never leaves a stale lock), always taken in this order (no deadlock):

* the **state lock** ``<state-db>.lock``: one run per state DB;
* the **repository lock**, keyed by the repository root's real path, in a directory
  only its account can create files in (``lock_dir``: ``/run/cvmfs-publisher`` for
  root; ``$CVMFS_PUBLISHER_LOCK_DIR`` if set): every command that writes the
  repository (convert, convert-image, loop rounds, gc) holds it, whatever its state
  DB -- a second run would clean the first one's ``.tmp/`` under its feet. Never
  inside the repository: on the cvmfs backend ``/cvmfs/REPO`` is writable only inside
  a transaction and no file under it may stay open across ``cvmfs_server publish``.
  Local to the machine, like a CernVM-FS release manager. Not in a world-writable
  directory: another local user could take the name first and stop the publisher.

Lock files are opened without following a symlink or blocking on a FIFO; what a
holder wrote is printed only sanitised (no terminal escapes, bounded).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR_ENV = "CVMFS_PUBLISHER_LOCK_DIR"


class Busy(RuntimeError):
    """Another publisher holds the lock."""


class LockError(RuntimeError):
    """The lock directory or file cannot be trusted (another user's, a symlink, ...)."""


def lock_path_for(state_db: Path) -> Path:
    return state_db.with_name(state_db.name + ".lock")


def lock_dir() -> Path:
    """Where repository locks live: ``$CVMFS_PUBLISHER_LOCK_DIR``; else for root
    ``/run/cvmfs-publisher`` (only root creates names in /run), for other accounts
    ``$XDG_RUNTIME_DIR/cvmfs-publisher``, else ``<tmp>/cvmfs-publisher-<uid>``."""
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    euid = os.geteuid()
    if euid == 0:
        return Path("/run/cvmfs-publisher")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "cvmfs-publisher"
    return Path(tempfile.gettempdir()) / f"cvmfs-publisher-{euid}"


def repository_lock_path(root: Path) -> Path:
    """The repository's lock file: the same for every spelling of its root (symlinks,
    relative paths), different for different repositories."""
    real = os.path.realpath(root)
    return lock_dir() / f"cvmfs-publisher-repo-{hashlib.sha256(real.encode()).hexdigest()[:32]}.lock"


def _private_dir(path: Path) -> int:
    """An fd of the lock directory, made 0700 when missing. Refused (LockError): a
    symlink or non-directory there, or a directory owned by another account than ours
    or root's, or one others may write (someone else could create our lock first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise LockError(f"lock directory {path}: {e.strerror} (want a directory of this account)") from None
    st = os.fstat(fd)
    euid = os.geteuid()
    problem = None
    if st.st_uid not in (0, euid):
        problem = f"owned by uid {st.st_uid}, not by this account (uid {euid}) or root"
    elif st.st_mode & 0o002:
        problem = f"writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        os.close(fd)
        raise LockError(f"lock directory {path} is {problem}: refusing to use it (remove it, or set "
                        f"${LOCK_DIR_ENV} to a directory of this account)")
    return fd


def _open_lock(path: Path, dir_fd: int | None = None) -> int:
    """Never following a symlink, never blocking on a FIFO; only a regular file."""
    name: str | Path = path.name if dir_fd is not None else path
    nofollow = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    # Without O_CREAT first: in a sticky dir with fs.protected_regular, an O_CREAT open of
    # another user's file is refused even when it exists.
    for _ in range(10):
        for flags in (os.O_RDWR, os.O_RDONLY):
            try:
                fd = os.open(name, flags | nofollow, dir_fd=dir_fd)
                break
            except FileNotFoundError:
                fd = None
                break
            except PermissionError:
                continue
            except OSError as e:  # ELOOP: a symlink; ENXIO: a socket
                raise LockError(f"lock file {path}: {e.strerror}") from None
        else:
            raise PermissionError(errno.EACCES, "cannot open the lock file", str(path))
        if fd is None:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644, dir_fd=dir_fd)
            except FileExistsError:
                continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LockError(f"lock file {path} is not a regular file: refusing to use it (remove it)")
        return fd
    raise OSError(errno.EAGAIN, "lock file keeps changing", str(path))


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to print: control and other non-printable characters (terminal
    escapes) as ``?``, at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return out[:limit] + "..." if len(out) > limit else out


def _holder(fd: int) -> str:
    try:
        return printable(os.pread(fd, 4096, 0).decode(errors="replace").strip())
    except OSError:
        return ""


@contextmanager
def exclusive(path: Path, what: str | None = None, *, private: bool = False) -> Iterator[None]:
    """Hold ``path``'s lock or raise Busy at once. ``what``: the repository, for the
    message; the holder's pid and command line are written into the file. ``private``:
    ``path``'s directory must be this account's (``_private_dir``), opened without
    following symlinks."""
    if private:
        dir_fd = _private_dir(path.parent)
        try:
            fd = _open_lock(path, dir_fd)
        finally:
            os.close(dir_fd)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if what is None:
                raise Busy(f"another cvmfs-publisher is working on this repository (lock {path} is held)") from None
            holder = _holder(fd)
            who = f"another cvmfs-publisher ({holder})" if holder else "another cvmfs-publisher"
            raise Busy(f"{who} is writing {what} (lock {path} is held)") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {printable(' '.join(sys.argv[1:]), 1000)}\n".encode(), 0)
        except OSError:  # opened read-only (another account's file): the lock holds all the same
            pass
        yield
    finally:
        os.close(fd)


def repository_what(root: Path) -> str:
    return f"repository {os.path.realpath(root)}"


@contextmanager
def exclusive_repository(root: Path) -> Iterator[None]:
    """The repository lock (after the state lock): Busy when another run writes it."""
    with exclusive(repository_lock_path(root), repository_what(root), private=True):
        yield
