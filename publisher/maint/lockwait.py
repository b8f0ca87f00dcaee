"""Waiting for the run lock (runlock.py) instead of giving up at once.

gc and check take the same exclusive lock a convert (or a loop round) holds while it
builds, so they never see, let alone remove, an image half-way through publishing.
A loop holds the lock only during a round, so they wait for the round to end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from publisher.core.runlock import Busy, exclusive, lock_path_for, repository_lock_path, repository_what

log = logging.getLogger(__name__)


@contextmanager
def exclusive_waiting(path: Path, wait: float, poll: float = 0.5, what: str | None = None,
                      private: bool = False) -> Iterator[None]:
    """Hold ``path``'s lock; wait up to ``wait`` seconds for it (Busy afterwards).
    ``what``, ``private``: as runlock.exclusive."""
    deadline = time.monotonic() + wait
    told = False
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(exclusive(path, what, private=private))
                break
            except Busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if not told:
                    log.info("another cvmfs-publisher holds %s%s; waiting up to %.0f s", path,
                             f" ({what})" if what else "", wait)
                    told = True
                time.sleep(min(poll, left))
        yield


@contextmanager
def run_locks_waiting(state_db: Path, root: Path, wait: float) -> Iterator[None]:
    """The state lock, then the repository lock (runlock.py), waiting up to ``wait``
    seconds in all."""
    deadline = time.monotonic() + wait
    with exclusive_waiting(lock_path_for(state_db), wait):
        with exclusive_waiting(repository_lock_path(root), max(0.0, deadline - time.monotonic()),
                               what=repository_what(root), private=True):
            yield
