"""The snapshotter's behaviour, as containerd's overlayfs snapshotter defines it.

Store (sqlite) holds the metadata, SnapshotDirs the directories; this module ties
them together and is what service.py exposes over gRPC. No grpc here.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .filters import FilterSyntaxError, parse_all
from .fs import Doomed, SnapshotDirs, disk_usage, overlay_supports_index
from .idmap import IdMap, IdMapError, IdmapUnsupported
from .idmapped import IdmappedLowers
from .labels import (CRI_LAYER_DIGEST_LABEL, CVMFS_LAYER_DIGEST_LABEL, DIFF_ID_LABEL, SNAPSHOT_REF_LABEL, SOURCE_LABEL,
                     validate_labels)
from .layer_source import LayerRequest, LayerSource, SourceUnavailable
from .lineage import Lineage, next_ducc_ids
from .metrics import Metrics
from .model import Info, Kind, Lower, Mount, Snapshot, Usage
from .readcache import KeyedCache
from .store import ParentFacts, Store

log = logging.getLogger(__name__)

MOUNTS_CACHE_SIZE = 1024  # Mounts answers of active/view snapshots kept in memory


class CleanupIncomplete(RuntimeError):
    """Some orphans could not be deleted (an INTERNAL error; the next Cleanup retries)."""


class Snapshotter:
    def __init__(
        self, root: Path, remote: LayerSource | None = None, metrics: Metrics | None = None, metacopy: bool = False
    ) -> None:
        self.root = Path(root)
        self.metrics = metrics
        options = ("index=off",) if overlay_supports_index() else ()
        if metacopy:
            # On every overlay: a lower holding metacopy files (a committed upper) is
            # refused by a mount without it.
            options += ("metacopy=on",)
        self.dirs = SnapshotDirs(self.root, options)
        self.store = Store(str(self.root / "metadata.db"))
        self.idmapped = IdmappedLowers(self.root)
        self.remote = remote
        # key -> (lowers, mounts): a snapshot's mounts never change while it exists
        self._mounts: KeyedCache[tuple[tuple[Lower, ...], list[Mount]]] = KeyedCache(MOUNTS_CACHE_SIZE)

    def close(self) -> None:
        self.store.close()
        self.dirs.close()
        if self.remote is not None:
            self.remote.close()

    # -- Prepare / View ----------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        validate_labels(labels)
        facts = self.store.parent_facts(parent) if parent else None  # read once, used thrice
        lineage = self._lineage(parent, labels, facts)
        if self.remote is not None and SNAPSHOT_REF_LABEL in labels:
            self._try_remote(parent, labels, lineage, facts)
        return self._create(key, parent, Kind.ACTIVE, labels, lineage, facts)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        validate_labels(labels)
        facts = self.store.parent_facts(parent) if parent else None
        return self._create(key, parent, Kind.VIEW, labels, None, facts)

    @staticmethod
    def _idmap(labels: dict[str, str]) -> IdMap | None:
        try:
            return IdMap.from_labels(labels)
        except IdMapError as e:
            raise InvalidArgument(str(e)) from None

    def _create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: dict[str, str],
        lineage: Lineage | None,
        facts: ParentFacts | None,
    ) -> list[Mount]:
        idmap = self._idmap(labels)
        # Stat the parent's dir before the write transaction: on a slow repository the
        # (bounded) stat must not hold the database lock. A bad parent is reported by
        # store.create, which re-checks everything inside the transaction.
        root_attrs = self._root_attributes(facts) if facts is not None and facts.kind == Kind.COMMITTED else None
        if idmap is not None:
            # As containerd's overlay snapshotter: the upper dir belongs to the pod's root.
            mode = root_attrs[0] if root_attrs is not None else 0o40755
            pod_root = idmap.root()
            if root_attrs is not None and root_attrs[1:] == pod_root:
                # containerd chowned the image already (remap-ids not declared): its
                # "<id>-remap" snapshot is the parent, shown as it is.
                idmap = None
            root_attrs = (mode, *pod_root)

        stale: list[Doomed] = []

        def make_dirs(snapshot_id: int, lowers: tuple[Lower, ...]) -> None:
            attrs = root_attrs if lowers or idmap is not None else None
            self.dirs.create(snapshot_id, kind, attrs, stale, idmap.encode() if idmap is not None else None)

        generation = self._mounts.generation()
        try:
            created = self.store.create(key, parent, kind, labels, make_dirs, lineage)
        finally:
            self._delete(stale)
        self._count("snapshots", kind.filter_name)
        if idmap is not None and created.snapshot.lowers:
            try:
                return self.dirs.mounts(created.snapshot, self._idmapped_lowers(key, created.snapshot, idmap))
            except BaseException:
                try:
                    self.remove(key)  # a user-namespaced snapshot without its mounts is of no use
                except Exception as e:  # noqa: BLE001 - the first error is the one to report
                    log.warning("could not remove %s after its failed Prepare: %s", key, e)
                raise
        mounts = self.dirs.mounts(created.snapshot)
        self._mounts.put(key, (created.snapshot.lowers, mounts), generation)  # the unpacker asks next
        return mounts

    def _idmapped_lowers(self, key: str, snap: Snapshot, idmap: IdMap) -> list[str]:
        lowers = [(lower.id, self.dirs.lower_dir(lower.id, lower.source)) for lower in snap.lowers]
        try:
            paths = self.idmapped.ensure(snap.id, idmap, lowers)
        except IdmapUnsupported as e:
            raise FailedPrecondition(
                f"snapshot {key!r}: user namespace: {e.filename} cannot be idmapped ({e.strerror}); "
                "a CernVM-FS (FUSE) repository cannot: on this host declare the proxy plugin's "
                'capabilities = ["only-remap-ids"] (containerd refuses user-namespaced pods) or none '
                "(containerd copies and chowns each pod's root fs), not \"remap-ids\"") from None
        except OSError as e:
            raise Unavailable(f"snapshot {key!r}: user namespace: idmapped mount of {e.filename} failed: "
                              f"{e.strerror}") from None
        # A Remove between our read of the row and the mounts released nothing yet (it
        # releases after the row is gone): the row, read again, says whether they are ours.
        try:
            still = self.store.lookup(key)[0] == snap.id
        except NotFound:
            still = False
        if not still:
            self.idmapped.release(snap.id)
            raise NotFound(f"snapshot {key!r} does not exist (removed while its mounts were made)")
        return paths

    def _count(self, counter: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, counter).labels(label).inc()

    def _root_attributes(self, parent: ParentFacts) -> tuple[int, int, int]:
        """Mode and owner of the stack's "/", i.e. of the parent's dir (the upper dir must carry them)."""
        path = self.dirs.lower_dir(parent.id, parent.source)
        if parent.source is not None and self.remote is not None:
            try:
                attrs = self.remote.root_attributes(path)
            except (SourceUnavailable, OSError) as e:
                raise Unavailable(f"repository directory {path} is not available: {e}") from None
            if attrs is not None:
                return attrs
        try:
            st = os.stat(path)
        except OSError as e:
            raise Unavailable(f"lower directory {path} is not available: {e}") from None
        return st.st_mode, st.st_uid, st.st_gid

    def _lineage(self, parent: str, labels: dict[str, str], facts: ParentFacts | None) -> Lineage:
        """Chain ids this snapshot will stand for, kept so children can be looked up."""
        chain_id = labels.get(SNAPSHOT_REF_LABEL)
        digest = labels.get(CVMFS_LAYER_DIGEST_LABEL) or labels.get(CRI_LAYER_DIGEST_LABEL)
        parent_ducc = facts.lineage.ducc if parent and facts is not None else None
        try:
            ducc = next_ducc_ids(parent_ducc, bool(parent), digest)
        except ValueError:
            ducc = None
        return Lineage(chain_id, ducc)

    def _try_remote(self, parent: str, labels: dict[str, str], lineage: Lineage, facts: ParentFacts | None) -> None:
        """Serve the layer from a repository: create a committed snapshot carrying the
        ref label with exactly this parent, then answer ALREADY_EXISTS (docs/DESIGN.md#remote-snapshots);
        containerd finds it with a List filter on (ref, parent)."""
        assert self.remote is not None
        ref = labels[SNAPSHOT_REF_LABEL]
        if parent and (facts is None or facts.kind != Kind.COMMITTED):
            return  # the normal path reports the bad parent
        digest = labels.get(CVMFS_LAYER_DIGEST_LABEL) or labels.get(CRI_LAYER_DIGEST_LABEL)
        # A bottom layer's chainID is its diffID (containerd before 2.3 sends no diff-id label).
        diff_id = labels.get(DIFF_ID_LABEL) or (None if parent else ref)
        request = LayerRequest(ref, digest, bool(parent), facts.lineage.chain_id if facts else None, lineage.ducc,
                               diff_id)
        match = self.remote.find(request)
        self._count("remote_layers", "hit" if match is not None else "miss")
        if match is None:
            log.info("layer %s (%s) not in any repository: normal pull", ref, digest or "digest unknown")
            return
        name = remote_snapshot_name(ref, parent)
        remote_labels = {k: v for k, v in labels.items() if k.startswith("containerd.io/snapshot")}
        remote_labels[SOURCE_LABEL] = match.source
        try:
            self.store.create_committed_remote(
                name,
                parent,
                remote_labels,
                match.source,
                match.whole_stack,
                lambda snapshot_id: self.dirs.link_remote(snapshot_id, match.source),
                lineage,
            )
            self._count("snapshots", "remote")
            log.info("layer %s served from %s", ref, match.source)
        except AlreadyExists:
            pass  # the same layer on the same parent, e.g. from another namespace
        raise AlreadyExists(f"target snapshot {ref!r} exists in repository {match.repository}")

    # -- the rest --------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        """The same list object while the snapshot exists (callers must not modify it)."""
        cached = self._mounts.get(key)
        if cached is not None:
            self._revalidate(key, cached[0])
            return cached[1]
        generation = self._mounts.generation()
        snap = self.store.snapshot(key)
        self._revalidate(key, snap.lowers)
        encoded = self.dirs.read_idmap(snap.id) if snap.lowers else None
        if encoded is not None:  # not kept: its idmapped lowers are ensured on every call
            return self.dirs.mounts(snap, self._idmapped_lowers(key, snap, IdMap.decode(encoded)))
        mounts = self.dirs.mounts(snap)
        self._mounts.put(key, (snap.lowers, mounts), generation)
        return mounts

    def _revalidate(self, key: str, lowers: Sequence[Lower]) -> None:
        """Repository dirs can vanish (unpublished, unmounted): fail clearly, never hang."""
        if self.remote is None:
            return
        for lower in lowers:
            if lower.source is None:
                continue
            try:
                ok = self.remote.is_available(lower.source)
            except SourceUnavailable as e:
                raise Unavailable(f"snapshot {key!r}: {e}") from None
            if not ok:
                raise Unavailable(f"snapshot {key!r}: repository directory {lower.source} is gone")

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        validate_labels(labels)
        snapshot_id, kind, _ = self.store.lookup(key)
        # Measure outside the transaction: a big upper dir takes a while to walk.
        try:
            usage = disk_usage(self.dirs.fs_dir(snapshot_id)) if kind == Kind.ACTIVE else Usage(0, 0)
        except OSError:
            # A Remove of the same key renamed the directory away mid-walk: NotFound, as if it
            # had come first (containerd's unpacker removes what a cancelled pull commits).
            self.store.lookup(key, settled=True)
            raise
        # The link is made in the commit's transaction, before the row says "committed":
        # a committed snapshot always has its link. Should the commit fail, the active
        # snapshot keeps a harmless link until Remove.
        try:
            self.store.commit(name, key, labels, usage, self.dirs.link_committed)
        finally:
            self._mounts.drop(key)

    def remove(self, key: str) -> None:
        detached: list[Doomed] = []
        removed: list[int] = []

        def detach(snapshot_id: int) -> None:
            self.dirs.detach(snapshot_id, detached)
            removed.append(snapshot_id)

        try:
            self.store.remove(key, detach)
        except BaseException:
            self.dirs.reattach(detached)  # the row is still there: give it its dir back
            raise
        finally:
            self._mounts.drop(key)
        self._delete(detached)
        for snapshot_id in removed:
            try:
                self.idmapped.release(snapshot_id)
            except OSError as e:
                log.warning("could not release the idmapped lowers of %s (Cleanup retries): %s", key, e)

    def _delete(self, doomed: list[Doomed]) -> list[tuple[str, Exception]]:
        """Delete doomed entries; a failure is logged and left to the next Cleanup (as
        containerd does: the snapshot is gone, its directory is garbage)."""
        failures = self.dirs.delete(doomed)
        for path, error in failures:
            log.warning("could not remove %s (Cleanup retries): %s", path, error)
        return failures

    def stat(self, key: str) -> Info:
        return self.store.stat(key)

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        validate_labels(info.labels)
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
        try:
            return disk_usage(self.dirs.fs_dir(snapshot_id))
        except OSError:  # removed meanwhile (as in commit): NotFound
            self.store.lookup(key, settled=True)
            raise

    def cleanup(self) -> None:
        # Decided and renamed away under the write lock, deleted after it (see fs.py).
        doomed: list[Doomed] = []
        idmap_failures: list[tuple[str, Exception]] = []

        def orphans(ids: set[int]) -> None:
            # Under the write lock: no snapshot is being created meanwhile.
            idmap_failures.extend(self.idmapped.release_orphans(ids))
            self.dirs.doom_orphans(ids, doomed)

        try:
            self.store.with_all_ids_locked(orphans)
        finally:
            failures = self._delete(doomed)  # even after a failure midway: they are orphans
        failures += idmap_failures
        if len(doomed) > len(failures):
            log.info("cleanup removed %d orphaned entries", len(doomed) - len(failures))
        if failures:
            path, error = failures[0]
            raise CleanupIncomplete(f"could not remove {len(failures)} orphaned entries, e.g. {path}: {error}")


def remote_snapshot_name(ref: str, parent: str) -> str:
    """Unique per (ref, parent): the same chainID can come back under another parent key."""
    return f"cvmfs-remote/{ref}/{hashlib.sha256(parent.encode()).hexdigest()[:32]}"
