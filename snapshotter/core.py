"""The snapshotter's behaviour, as containerd's overlayfs snapshotter defines it.

Store (sqlite) holds the metadata, SnapshotDirs the directories; this module ties
them together and is what service.py exposes over gRPC. No grpc here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from .errors import AlreadyExists, InvalidArgument
from .filters import FilterSyntaxError, parse_all
from .fs import SnapshotDirs, disk_usage, overlay_supports_index
from .model import Info, Kind, Lower, Mount, Usage
from .store import Store

log = logging.getLogger(__name__)

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"


@dataclass(frozen=True)
class RemoteLayer:
    """A repository directory that can stand in for a layer snapshot."""

    source: str
    whole_stack: bool  # True: a chain dir, the complete root fs on its own


class RemoteLayers(Protocol):
    """Finds repository content for a layer containerd is about to unpack."""

    def find(self, labels: dict[str, str], parent_sources: Sequence[str | None]) -> RemoteLayer | None: ...


class Snapshotter:
    def __init__(self, root: Path, remote: RemoteLayers | None = None) -> None:
        self.root = Path(root)
        options = ("index=off",) if overlay_supports_index() else ()
        self.dirs = SnapshotDirs(self.root, options)
        self.store = Store(str(self.root / "metadata.db"))
        self.remote = remote

    def close(self) -> None:
        self.store.close()

    # -- Prepare / View ----------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        if self.remote is not None and SNAPSHOT_REF_LABEL in labels:
            self._try_remote(key, parent, labels)
        return self._create(key, parent, Kind.ACTIVE, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, Kind.VIEW, labels)

    def _create(self, key: str, parent: str, kind: Kind, labels: dict[str, str]) -> list[Mount]:
        def make_dirs(snapshot_id: int, lowers: tuple[Lower, ...]) -> None:
            parent_dir = self.dirs.lower_dir(lowers[0].id, lowers[0].source) if lowers else None
            self.dirs.create(snapshot_id, kind, parent_dir)

        created = self.store.create(key, parent, kind, labels, make_dirs)
        return self.dirs.mounts(created.snapshot)

    def _try_remote(self, key: str, parent: str, labels: dict[str, str]) -> None:
        """Serve the layer from a repository: create the committed snapshot named by
        the ref label with exactly this parent and answer ALREADY_EXISTS (DESIGN §3)."""
        raise NotImplementedError  # filled in by the remote-layers work

    # -- the rest --------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        return self.dirs.mounts(self.store.snapshot(key))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        snapshot_id, kind, _ = self.store.lookup(key)
        # Measure outside the transaction: a big upper dir takes a while to walk.
        usage = disk_usage(self.dirs.fs_dir(snapshot_id)) if kind == Kind.ACTIVE else Usage(0, 0)
        self.store.commit(name, key, labels, usage)

    def remove(self, key: str) -> None:
        snapshot_id, _ = self.store.remove(key)
        self.dirs.remove(snapshot_id)

    def stat(self, key: str) -> Info:
        return self.store.stat(key)

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        return self.store.update(info.name, info.labels, fieldpaths)

    def walk(self, filters: Sequence[str]) -> list[Info]:
        try:
            flt = parse_all(filters)
        except FilterSyntaxError as e:
            raise InvalidArgument(str(e)) from None
        return self.store.walk(flt)

    def usage(self, key: str) -> Usage:
        snapshot_id, kind, stored = self.store.lookup(key)
        if kind == Kind.COMMITTED:
            return stored
        return disk_usage(self.dirs.fs_dir(snapshot_id))

    def cleanup(self) -> None:
        removed = self.dirs.cleanup(self.store.all_ids())
        if removed:
            log.info("cleanup removed %d orphaned entries", len(removed))


__all__ = ["Snapshotter", "RemoteLayer", "RemoteLayers", "AlreadyExists"]
