"""Describe directory trees for comparisons (tests, e2e checks, `check`).

tree_snapshot(root)  what a directory holds, one EntryInfo per path ("/" is the root)
merge_view(layers)   what overlayfs would show for layer dirs given topmost first,
                     honouring converted (char 0:0, opaque xattr) and raw (.wh.) whiteouts
diff_trees(a, b)     readable differences, optionally ignoring some fields
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from publisher.unpack.lowers import read_xattrs
from publisher.unpack.whiteouts import OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, NameKind, classify, whited_out_name

_TYPES = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
          (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket"))


@dataclass(frozen=True)
class EntryInfo:
    type: str                                # file | dir | symlink | char | block | fifo | socket
    mode: int                                # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None = None                  # files and symlinks only
    target: str | None = None                # symlinks
    sha256: str | None = None                # regular files' content
    rdev: tuple[int, int] | None = None      # devices
    mtime_ns: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def xattr(self, name: str) -> bytes | None:
        return dict(self.xattrs).get(name)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def entry_info(path: str, overlay_xattrs: bool = False) -> EntryInfo:
    st = os.lstat(path)
    kind = next(name for test, name in _TYPES if test(st.st_mode))
    xattrs = read_xattrs(Path(path), skip_overlay=not overlay_xattrs)
    return EntryInfo(
        type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        size=st.st_size if kind in ("file", "symlink") else None,
        target=os.readlink(path) if kind == "symlink" else None,
        sha256=_file_sha256(path) if kind == "file" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        mtime_ns=st.st_mtime_ns,
        xattrs=tuple(sorted(xattrs.items())))


def tree_snapshot(root: os.PathLike[str] | str, *, overlay_xattrs: bool = False) -> dict[str, EntryInfo]:
    """Every entry below `root` (never following symlinks), keyed "/", "/etc", ...

    trusted.overlay.* xattrs are left out unless asked for: an overlay mount hides them,
    so a layer dir and a mount of it then compare equal."""
    top = os.fspath(root)
    out: dict[str, EntryInfo] = {"/": entry_info(top, overlay_xattrs)}
    stack = [("", top)]
    while stack:
        rel, real = stack.pop()
        with os.scandir(real) as it:
            for ent in it:
                key = f"{rel}/{ent.name}"
                out[key] = entry_info(ent.path, overlay_xattrs)
                if ent.is_dir(follow_symlinks=False):
                    stack.append((key, ent.path))
    return dict(sorted(out.items()))


def _drop_subtree(view: dict[str, EntryInfo], path: str, keep_self: bool) -> None:
    prefix = "/" if path == "/" else path + "/"
    for key in [k for k in view if k.startswith(prefix) or (k == path and not keep_self)]:
        del view[key]


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def merge_view(layers_top_first: Sequence[os.PathLike[str] | str]) -> dict[str, EntryInfo]:
    """The tree an overlay mount of these layer dirs (lowerdir order: topmost first) shows."""
    view: dict[str, EntryInfo] = {}
    for layer in reversed(list(layers_top_first)):
        snap = tree_snapshot(layer, overlay_xattrs=True)
        # Deletions first: they act on the layers below, never on this layer's entries.
        for path, info in snap.items():
            parent, _, name = path.rpartition("/")
            parent = parent or "/"
            kind = classify(name)
            if kind is NameKind.OPAQUE:
                _drop_subtree(view, parent, keep_self=True)
            elif kind is NameKind.WHITEOUT:
                _drop_subtree(view, _join(parent, whited_out_name(name)), keep_self=False)
            elif info.type == "char" and info.rdev == (0, 0):
                _drop_subtree(view, path, keep_self=False)
            elif info.type == "dir" and info.xattr(OPAQUE_XATTR) == b"y":
                _drop_subtree(view, path, keep_self=True)
        for path, info in snap.items():
            name = path.rpartition("/")[2]
            if classify(name) is not NameKind.PLAIN or (info.type == "char" and info.rdev == (0, 0)):
                continue
            below = view.get(path)
            if below is not None and below.type == "dir" and info.type != "dir":
                _drop_subtree(view, path, keep_self=False)
            view[path] = dataclasses.replace(info, xattrs=tuple(
                (k, v) for k, v in info.xattrs if not k.startswith(OVERLAY_XATTR_PREFIX)))
    return dict(sorted(view.items()))


def diff_trees(a: dict[str, EntryInfo], b: dict[str, EntryInfo],
               ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable differences between two snapshots; `ignore` names EntryInfo fields
    to leave out (e.g. "mtime_ns")."""
    skip = set(ignore)
    fields = [f.name for f in dataclasses.fields(EntryInfo) if f.name not in skip]
    out: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        x, y = a.get(path), b.get(path)
        if x is None or y is None:
            out.append(f"{path}: only in {'second' if x is None else 'first'}")
            continue
        for name in fields:
            vx, vy = getattr(x, name), getattr(y, name)
            if vx != vy:
                out.append(f"{path}: {name} {vx!r} != {vy!r}")
    return out


__all__ = ["EntryInfo", "tree_snapshot", "merge_view", "diff_trees", "entry_info"]
