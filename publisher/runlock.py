"""One publisher per repository at a time.

A second run would clean the first one's ``.tmp/`` under its feet. The lock is a
file next to the state DB (never inside the repository: on the cvmfs backend no
file under /cvmfs/REPO may stay open). flock: released by the kernel when the
process dies, so a kill -9 never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Busy(RuntimeError):
    """Another publisher holds the lock."""


def lock_path_for(state_db: Path) -> Path:
    return state_db.with_name(state_db.name + ".lock")


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another cvmfs-publisher is working on this repository (lock {path} is held)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
