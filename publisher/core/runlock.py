"""One publisher per state and one writer per repository at a time.

Two locks, both flock (released by the kernel when the process dies, so a kill -9
never leaves a stale lock), always taken in this order (no deadlock):

* the **state lock** ``<state-db>.lock``: one run per state DB;
* the **repository lock**, keyed by the repository root's real path, in
  ``/run/lock`` (``$CVMFS_PUBLISHER_LOCK_DIR``; the temp dir where ``/run/lock`` is
  missing): every command that writes the repository (convert, convert-image, loop
  rounds, gc) holds it, whatever its state DB -- a second run would clean the
  first one's ``.tmp/`` under its feet. Never inside the repository: on the cvmfs
  backend ``/cvmfs/REPO`` is writable only inside a transaction and no file under
  it may stay open across ``cvmfs_server publish``. Local to the machine, like a
  CernVM-FS release manager.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR_ENV = "CVMFS_PUBLISHER_LOCK_DIR"


class Busy(RuntimeError):
    """Another publisher holds the lock."""


def lock_path_for(state_db: Path) -> Path:
    return state_db.with_name(state_db.name + ".lock")


def lock_dir() -> Path:
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    run_lock = Path("/run/lock")
    return run_lock if run_lock.is_dir() else Path(tempfile.gettempdir())


def repository_lock_path(root: Path) -> Path:
    """The repository's lock file: the same for every spelling of its root (symlinks,
    relative paths), different for different repositories."""
    real = os.path.realpath(root)
    return lock_dir() / f"cvmfs-publisher-repo-{hashlib.sha256(real.encode()).hexdigest()[:32]}.lock"


def _open_lock(path: Path) -> int:
    # Without O_CREAT first: in a sticky dir (/run/lock) with fs.protected_regular, an
    # O_CREAT open of another user's file is refused even when it exists.
    for _ in range(10):
        for flags in (os.O_RDWR, os.O_RDONLY):
            try:
                return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                break
            except PermissionError:
                continue
        else:
            raise PermissionError(errno.EACCES, "cannot open the lock file", str(path))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o666)  # other accounts writing the same repository lock it too
        except OSError:
            pass
        return fd
    raise OSError(errno.EAGAIN, "lock file keeps changing", str(path))


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


@contextmanager
def exclusive(path: Path, what: str | None = None) -> Iterator[None]:
    """Hold ``path``'s lock or raise Busy at once. ``what``: the repository, for the
    message; the holder's pid and command line are written into the file."""
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
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv[1:])[:1000]}\n".encode(), 0)
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
    with exclusive(repository_lock_path(root), repository_what(root)):
        yield
