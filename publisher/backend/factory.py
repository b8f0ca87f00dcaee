"""``make_backend``: the backend for ``--backend NAME`` (beside the backends, not in base.py:
the cvmfs backend builds on base.py, so only this module picks between them)."""

from __future__ import annotations

import os
from pathlib import Path

from publisher.backend.base import BACKENDS, Backend, BackendError


def make_backend(name: str, root: Path, *, cvmfs_repo: str | None = None,
                 cvmfs_server: str | None = None) -> Backend:
    """The backend for ``--backend NAME``.

    cvmfs: the repository name is the root's last component (``/cvmfs/NAME``); a
    different ``cvmfs_repo`` (the wishlist's) is refused -- publishing into one
    repository while the transaction is opened on another would write outside any
    transaction. ``cvmfs_server``: the command (default ``$CVMFS_SERVER`` or
    ``cvmfs_server`` on PATH).
    """
    if name == "local":
        return Backend(root)
    if name == "cvmfs":
        from publisher.backend.cvmfs import CvmfsBackend  # (only when asked: the local backend needs none of it)

        repo = Path(os.path.abspath(root)).name
        if cvmfs_repo is not None and cvmfs_repo != repo:
            raise BackendError(f"--backend cvmfs: the repository root {root} is repository {repo!r}, "
                               f"but the wishlist names cvmfs_repo {cvmfs_repo!r}")
        return CvmfsBackend(root, repo, command=cvmfs_server or os.environ.get("CVMFS_SERVER") or "cvmfs_server")
    raise BackendError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
