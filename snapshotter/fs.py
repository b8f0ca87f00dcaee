"""Directories under the snapshotter root and the mount specs that use them.

    <root>/snapshots/<id>/fs     upper dir (active) or content (committed)
    <root>/snapshots/<id>/work   overlay work dir (active only)
    <root>/snapshots/<id>/idmap  the user namespace mapping of its lowers (idmapped.py)
    <root>/l/<id>                link to the directory a lower shows (ours or a repository's)

Every overlay lower is named `<root>/l/<id>`: the lowers then share one short common
prefix, so containerd's option compaction (chdir into the prefix) keeps even 128-layer
mounts within a page. Only committed snapshots are lowers, so a local snapshot gets its
link when it is committed, not when it is prepared: creating an inode is the dearest
step of a Prepare, and most active snapshots (container root file systems) are never
committed. Mounts are performed by containerd, never here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.fsutil.atomic import remove_tree

from .model import Kind, Lower, Mount, Snapshot, Usage

_NEW_PREFIX = "new-"
_DOOMED_PREFIX = "rm-"
LOCK_FILE = "lock"
LOWERDIR_CACHE_SIZE = 256  # lowerdir strings of stacks kept in memory

log = logging.getLogger(__name__)


class RootInUse(RuntimeError):
    """Another process serves from the same root directory."""


@dataclass(frozen=True)
class Doomed:
    """An entry renamed to an rm-* name, to be deleted by whoever holds it."""

    path: str
    origin: str  # where it was (to put it back when the transaction fails)


def overlay_supports_index() -> bool:
    """containerd adds index=off when the module knows the option (avoids EBUSY on shared lowers)."""
    return os.path.exists("/sys/module/overlay/parameters/index")


@dataclass
class SnapshotDirs:
    root: Path
    overlay_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.snapshots = self.root / "snapshots"
        self.links = self.root / "l"
        for d in (self.root, self.snapshots, self.links):
            d.mkdir(mode=0o700 if d == self.root else 0o755, parents=True, exist_ok=True)
        # One process per root: Cleanup tells a crash's rm-* leftovers from the ones a
        # live Remove is deleting by the claims of this process, so there must be no other.
        self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RootInUse(f"another cvmfs-snapshotter is using the root directory {self.root}") from None
        self._claimed: set[str] = set()  # rm-* names some thread of ours is deleting
        self._claims_lock = threading.Lock()
        # str() of a Path is not free; mount options name up to hundreds of lowers.
        self._snapshots_str = str(self.snapshots)
        self._links_str = str(self.links)
        self._lowerdirs: dict[tuple[int, int], str] = {}  # see _lowerdir

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- paths ----------------------------------------------------------------------

    def fs_dir(self, snapshot_id: int) -> str:
        return f"{self._snapshots_str}/{snapshot_id}/fs"

    def work_dir(self, snapshot_id: int) -> str:
        return f"{self._snapshots_str}/{snapshot_id}/work"

    def link(self, snapshot_id: int) -> str:
        return f"{self._links_str}/{snapshot_id}"

    def lower_dir(self, snapshot_id: int, source: str | None) -> str:
        """The real directory a lower shows (for bind mounts and stat)."""
        return source if source is not None else self.fs_dir(snapshot_id)

    # -- creation and removal --------------------------------------------------------
    #
    # Every name under snapshots/ and l/ is created, renamed or given up only inside the
    # store's write transaction (the callers run these methods from it): a Cleanup, which
    # decides in such a transaction too, then sees rows and names that agree. Only the
    # contents of "doomed" entries (renamed to rm-*, owned by the one caller that doomed
    # or claimed them) are deleted outside, where it may take long.

    def create(
        self,
        snapshot_id: int,
        kind: Kind,
        root_attrs: tuple[int, int, int] | None,
        doomed: list[Doomed],
        idmap: str | None = None,
    ) -> None:
        """Create <id>/fs (and work) under a temporary name, then rename into place,
        so a crash never leaves a half-made snapshot dir under its final name. What a
        crash had left under these names is added to `doomed`: the caller deletes it."""
        final = self.snapshots / str(snapshot_id)
        tmp = self.snapshots / f"{_NEW_PREFIX}{snapshot_id}"
        for stale in (final, tmp):  # left by a crash before its row was committed: never in use
            if os.path.lexists(stale):
                doomed.append(self._doom(str(stale)))
        tmp.mkdir(mode=0o700)
        fs = tmp / "fs"
        fs.mkdir(mode=0o755)
        if root_attrs is not None:
            # The upper dir's attributes are what overlay shows for "/": copy the parent's.
            mode, uid, gid = root_attrs
            os.lchown(fs, uid, gid)
            os.chmod(fs, stat.S_IMODE(mode))
        if kind == Kind.ACTIVE:
            (tmp / "work").mkdir(mode=0o711)
        if idmap is not None:
            (tmp / "idmap").write_text(idmap)
        os.rename(tmp, final)

    def read_idmap(self, snapshot_id: int) -> str | None:
        try:
            with open(f"{self._snapshots_str}/{snapshot_id}/idmap") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def link_committed(self, snapshot_id: int) -> None:
        """The lower link of a local snapshot being committed (see the module doc)."""
        target = f"../snapshots/{snapshot_id}/fs"
        try:
            os.symlink(target, self.link(snapshot_id))
        except FileExistsError:  # left by a failed commit or an older version: replace it
            self._replace_link(snapshot_id, target)

    def link_remote(self, snapshot_id: int, source: str) -> None:
        self._replace_link(snapshot_id, source)

    def _replace_link(self, snapshot_id: int, target: str) -> None:
        link = self.link(snapshot_id)
        tmp = f"{link}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.rename(tmp, link)

    def detach(self, snapshot_id: int, doomed: list[Doomed]) -> None:
        """Doom a snapshot's link and dir into `doomed` (its row is being deleted in the
        same transaction); `reattach` undoes this should that transaction fail."""
        for path in (self.link(snapshot_id), f"{self._snapshots_str}/{snapshot_id}"):
            if os.path.lexists(path):
                doomed.append(self._doom(path))

    def reattach(self, doomed: list[Doomed]) -> None:
        for d in doomed:
            try:
                os.rename(d.path, d.origin)
            except OSError as e:  # the next Cleanup deletes it; the row is then without dir
                log.error("could not put %s back to %s: %s", d.path, d.origin, e)
            self._release(d)

    def doom_orphans(self, known_ids: set[int], doomed: list[Doomed]) -> None:
        """Doom every entry no snapshot owns. Must run in the store's write transaction
        with `known_ids` read in it: no creation is then half done, so a `new-*` dir, a
        dir or link whose id has no row, an unowned `rm-*` is a crash's (or an earlier
        failed deletion's) leftover. `rm-*` entries a live Remove/Cleanup owns are skipped.
        Adds to `doomed` as it goes: the caller deletes them even after a failure midway."""
        with os.scandir(self.snapshots) as it:
            entries = list(it)
        for entry in entries:
            if entry.name.isdigit() and int(entry.name) in known_ids:
                continue
            if entry.name.startswith(_DOOMED_PREFIX):
                with self._claims_lock:
                    if entry.name in self._claimed:
                        continue  # being deleted by its owner
                    self._claimed.add(entry.name)
                doomed.append(Doomed(entry.path, entry.path))
            else:
                doomed.append(self._doom(entry.path))
        with os.scandir(self.links) as it:
            entries = list(it)
        for entry in entries:
            if not (entry.name.isdigit() and int(entry.name) in known_ids):
                doomed.append(self._doom(entry.path))

    def delete(self, doomed: list[Doomed]) -> list[tuple[str, Exception]]:
        """Delete doomed entries (outside any transaction); returns the failures, which
        stay as unowned rm-* entries for the next Cleanup."""
        failures = []
        for d in doomed:
            try:
                remove_tree(Path(d.path))
            except Exception as e:  # noqa: BLE001 - reported by the caller, retried by Cleanup
                failures.append((d.path, e))
            finally:
                self._release(d)
        return failures

    def _doom(self, path: str) -> Doomed:
        """Rename `path` to a unique rm-* name under snapshots/ owned by the caller.
        Unique, because an id that never committed is handed out again after a crash."""
        name = f"{_DOOMED_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:12]}"
        with self._claims_lock:
            self._claimed.add(name)
        doomed = Doomed(f"{self._snapshots_str}/{name}", path)
        try:
            os.rename(path, doomed.path)
        except BaseException:
            self._release(doomed)
            raise
        return doomed

    def _release(self, d: Doomed) -> None:
        with self._claims_lock:
            self._claimed.discard(os.path.basename(d.path))

    # -- mounts ----------------------------------------------------------------------

    def mounts(self, snap: Snapshot, lower_paths: list[str] | None = None) -> list[Mount]:
        """The same mount specs as containerd's overlayfs snapshotter; `lower_paths` (for
        idmapped lowers) replace the lowers' own paths."""
        if not snap.lowers:
            flag = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", self.fs_dir(snap.id), (flag, "rbind"))]
        options = list(self.overlay_options)
        if snap.kind == Kind.ACTIVE:
            options.append(f"workdir={self.work_dir(snap.id)}")
            options.append(f"upperdir={self.fs_dir(snap.id)}")
        elif len(snap.lowers) == 1:
            lower = snap.lowers[0]
            path = lower_paths[0] if lower_paths else self.lower_dir(lower.id, lower.source)
            return [Mount("bind", path, ("ro", "rbind"))]
        if lower_paths:
            options.append("lowerdir=" + ":".join(lower_paths))
        else:
            options.append("lowerdir=" + self._lowerdir(snap.lowers))
        return [Mount("overlay", "overlay", tuple(options))]


    def _lowerdir(self, lowers: tuple[Lower, ...]) -> str:
        """The lowerdir value: each lower's link, nearest first. A stack is fixed by its
        top id and depth (ids are never reused), and an unpacker's next layer sits on the
        stack it asked for last: so the string is that one's with one link in front."""
        key = (lowers[0].id, len(lowers))
        hit = self._lowerdirs.get(key)
        if hit is not None:
            return hit
        below = self._lowerdirs.get((lowers[1].id, len(lowers) - 1)) if len(lowers) > 1 else None
        if below is not None:
            hit = f"{self.link(lowers[0].id)}:{below}"
        else:
            hit = ":".join(self.link(lower.id) for lower in lowers)
        if len(self._lowerdirs) >= LOWERDIR_CACHE_SIZE:
            self._lowerdirs.clear()
        self._lowerdirs[key] = hit
        return hit


def disk_usage(path: str) -> Usage:
    """Like containerd's fs.DiskUsage: blocks of each inode counted once, root included.

    Walks fd-relative with one open directory at a time and no recursion: a container
    can build a tree far deeper than the recursion limit, and its paths exceed PATH_MAX."""
    seen: set[int] = set()
    size = 0

    def count(st: os.stat_result) -> None:
        nonlocal size
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            size += st.st_blocks * 512

    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return Usage(0, 0)
    count(top)
    if stat.S_ISDIR(top.st_mode):
        _walk_dirs(path, top, count)
    return Usage(size=size, inodes=len(seen))


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _walk_dirs(path: str, top: os.stat_result, visit) -> None:
    """`visit(lstat)` for every entry below `path`, depth first; climbs back with "..",
    checking it is the directory it came from."""
    fd = _open_dir(path)
    try:
        frames = [(top, _scan(fd, visit))]  # per level: its stat, its subdirs still to visit
        while frames:
            _, subdirs = frames[-1]
            if subdirs:
                try:
                    child = _open_dir(subdirs.pop(), dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):  # gone or replaced meanwhile
                    continue
                os.close(fd)
                fd = child
                frames.append((os.fstat(fd), _scan(fd, visit)))
                continue
            frames.pop()
            if frames:
                parent = _open_dir("..", dir_fd=fd)
                os.close(fd)
                fd = parent
                st, expected = os.fstat(fd), frames[-1][0]
                if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
                    raise OSError(f"{path}: a directory was moved while its usage was measured")
    finally:
        os.close(fd)


def _scan(fd: int, visit) -> list[str]:
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            visit(st)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
    return subdirs
