"""Directories under the snapshotter root and the mount specs that use them.

    <root>/snapshots/<id>/fs     upper dir (active) or content (committed)
    <root>/snapshots/<id>/work   overlay work dir (active only)
    <root>/l/<id>                link to the directory a lower shows (ours or a repository's)

Every overlay lower is named `<root>/l/<id>`: the lowers then share one short common
prefix, so containerd's option compaction (chdir into the prefix) keeps even 128-layer
mounts within a page. Only committed snapshots are lowers, so a local snapshot gets its
link when it is committed, not when it is prepared: creating an inode is the dearest
step of a Prepare, and most active snapshots (container root file systems) are never
committed. Mounts are performed by containerd, never here.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.layout import remove_tree

from .model import Kind, Mount, Snapshot, Usage

_NEW_PREFIX = "new-"
_REMOVED_PREFIX = "rm-"


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
        # str() of a Path is not free; mount options name up to hundreds of lowers.
        self._snapshots_str = str(self.snapshots)
        self._links_str = str(self.links)

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

    def create(self, snapshot_id: int, kind: Kind, root_attrs: tuple[int, int, int] | None) -> None:
        """Create <id>/fs (and work) under a temporary name, then rename into place,
        so a crash never leaves a half-made snapshot dir under its final name."""
        final = self.snapshots / str(snapshot_id)
        if final.exists():  # left by a crash before its row was committed: never in use
            remove_tree(final)
        tmp = self.snapshots / f"{_NEW_PREFIX}{snapshot_id}"
        if tmp.exists():
            remove_tree(tmp)
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
        os.rename(tmp, final)

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

    def remove(self, snapshot_id: int) -> None:
        """Remove a snapshot's dirs after its row is gone (a crash here leaves an orphan
        that Cleanup removes)."""
        try:
            os.unlink(self.link(snapshot_id))
        except FileNotFoundError:
            pass
        final = self.snapshots / str(snapshot_id)
        if not final.exists():
            return
        doomed = self.snapshots / f"{_REMOVED_PREFIX}{snapshot_id}"
        os.rename(final, doomed)
        remove_tree(doomed)

    def cleanup(self, known_ids: set[int]) -> list[str]:
        """Remove every directory and link no snapshot owns; returns what was removed."""
        removed = []
        for entry in os.scandir(self.snapshots):
            if not (entry.name.isdigit() and int(entry.name) in known_ids):
                remove_tree(Path(entry.path))
                removed.append(entry.path)
        for entry in os.scandir(self.links):
            if not (entry.name.isdigit() and int(entry.name) in known_ids):
                os.unlink(entry.path)
                removed.append(entry.path)
        return removed

    # -- mounts ----------------------------------------------------------------------

    def mounts(self, snap: Snapshot) -> list[Mount]:
        """The same mount specs as containerd's overlayfs snapshotter."""
        if not snap.lowers:
            flag = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", self.fs_dir(snap.id), (flag, "rbind"))]
        options = list(self.overlay_options)
        if snap.kind == Kind.ACTIVE:
            options.append(f"workdir={self.work_dir(snap.id)}")
            options.append(f"upperdir={self.fs_dir(snap.id)}")
        elif len(snap.lowers) == 1:
            lower = snap.lowers[0]
            return [Mount("bind", self.lower_dir(lower.id, lower.source), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(self.link(lower.id) for lower in snap.lowers))
        return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(path: str) -> Usage:
    """Like containerd's fs.DiskUsage: blocks of each inode counted once, root included."""
    seen: set[int] = set()
    size = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(current) as it:
                    stack.extend(entry.path for entry in it)
            except FileNotFoundError:
                continue
    return Usage(size=size, inodes=len(seen))
