"""The idmapped lower dirs of user-namespaced snapshots, kept under the snapshotter root:

    <root>/idmap/<id>/<lower id>     an idmapped, read-only mount of that lower's directory

They live outside snapshots/ on purpose: a removed snapshot's dir is deleted recursively,
and a walk into a mounted repository dir would delete the repository's files. Here nothing
is ever deleted recursively: mounts are detached, then the empty dirs removed with rmdir.
Mounts do not survive a reboot; Mounts() makes them again when they are missing.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .idmap import IdMap, detach, idmapped_bind, mounted_names, userns_fd

log = logging.getLogger(__name__)


class IdmappedLowers:
    def __init__(self, root: Path) -> None:
        self.base = Path(root) / "idmap"
        self.base.mkdir(mode=0o700, exist_ok=True)
        self._base_str = str(self.base)
        self._lock = threading.Lock()  # one snapshot's mounts are made by one thread at a time

    def paths(self, snapshot_id: int, lower_ids: list[int]) -> list[str]:
        return [f"{self._base_str}/{snapshot_id}/{i}" for i in lower_ids]

    def ensure(self, snapshot_id: int, idmap: IdMap, lowers: list[tuple[int, str]]) -> list[str]:
        """Idmapped mounts of each (lower id, directory), made where missing; their paths,
        in the order given. Raises IdmapUnsupported / OSError, leaving what it made (Remove
        or Cleanup detaches it)."""
        top = f"{self._base_str}/{snapshot_id}"
        paths = self.paths(snapshot_id, [i for i, _ in lowers])
        with self._lock:
            present = mounted_names(top)
            missing = [(str(i), src) for i, src in lowers if str(i) not in present]
            if not missing:
                return paths
            os.makedirs(top, mode=0o700, exist_ok=True)
            ns = userns_fd(idmap)
            try:
                for name, src in missing:
                    target = f"{top}/{name}"
                    os.makedirs(target, mode=0o700, exist_ok=True)
                    idmapped_bind(src, target, ns)
            finally:
                os.close(ns)
        return paths

    def release(self, snapshot_id: int) -> None:
        """Detach and remove a snapshot's idmapped lowers (nothing happens when it has none)."""
        top = f"{self._base_str}/{snapshot_id}"
        if not os.path.isdir(top):
            return
        with self._lock:
            self._release(top)

    def _release(self, top: str) -> None:
        try:
            names = os.listdir(top)
        except FileNotFoundError:
            return
        for name in names:
            path = f"{top}/{name}"
            detach(path)
            os.rmdir(path)  # never recursive: should the detach not have taken, this fails
        os.rmdir(top)

    def release_orphans(self, known_ids: set[int]) -> list[tuple[str, Exception]]:
        """Release the dirs of snapshots that no longer exist (a crash between the removal
        of the row and the detach); returns the failures."""
        failures = []
        for entry in os.scandir(self.base):
            if entry.name.isdigit() and int(entry.name) in known_ids:
                continue
            try:
                with self._lock:
                    self._release(entry.path)
            except OSError as e:
                failures.append((entry.path, e))
        return failures
