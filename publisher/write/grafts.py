"""Grafts: a published CernVM-FS file placed again without copying or hashing its content.

In a ``cvmfs_server`` transaction, ``/cvmfs/REPO`` is an overlay union over the published
revision. Hard-linking a published (lower) file copies it up into the scratch area, and
``publish`` compresses and hashes it again although the storage has it already. A *graft*
avoids both: an empty file NAME with the owner, mode and times the entry needs, and beside
it ``.cvmfsgraft-NAME``::

    size=20000000
    checksum=0000000000000000000000000000000000000000
    chunk_offsets=0,4733193,...
    chunk_checksums=e9431982c1511a84e0bea135ce8900e19b18f773,...

``publish`` then writes the catalog entry with that content and drops the graft file
(CernVM-FS >= 2.5). The content hashes come from the published file itself: the CernVM-FS
client answers ``user.chunk_list`` (``hash,offset,size`` per chunk) and ``user.compression``
on it, and the union passes those reads through. A file that is not published (written in
this transaction), has extended attributes of its own (a graft would drop them: measured on
CernVM-FS 2.12) or is not zlib-compressed is not grafted; the caller links it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

GRAFT_PREFIX = ".cvmfsgraft-"
_CHUNK_LIST = "user.chunk_list"
_COMPRESSION = "user.compression"


@dataclass(frozen=True)
class GraftInfo:
    size: int
    chunks: tuple[tuple[str, int, int], ...]  # (hash, offset, size)

    def text(self) -> str:
        if len(self.chunks) == 1:
            return f"size={self.size}\nchecksum={self.chunks[0][0]}\n"
        first = self.chunks[0][0]
        # a chunked file's catalog entry has no whole-file hash: zeros of the chunks' kind
        zeros = "0" * len(first.split("-")[0]) + first[len(first.split("-")[0]):]
        return (f"size={self.size}\nchecksum={zeros}\n"
                f"chunk_offsets={','.join(str(c[1]) for c in self.chunks)}\n"
                f"chunk_checksums={','.join(c[0] for c in self.chunks)}\n")


def graft_info(path: str, size: int) -> GraftInfo | None:
    """What a graft of the file at ``path`` (not followed) needs, or None: not graftable."""
    try:
        if os.listxattr(path, follow_symlinks=False):
            return None  # xattrs of its own (the client's user.* answers are never listed)
        listing = os.getxattr(path, _CHUNK_LIST, follow_symlinks=False)
        if os.getxattr(path, _COMPRESSION, follow_symlinks=False).strip() != b"zlib":
            return None
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ERANGE):
            return None
        raise
    chunks = []
    for line in listing.decode("ascii", "replace").splitlines()[1:]:
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        chunks.append((parts[0], int(parts[1]), int(parts[2])))
    if not chunks or chunks[0][1] != 0 or sum(c[2] for c in chunks) != size:
        return None
    return GraftInfo(size, tuple(chunks))


FileKey = tuple[int, int, int, int, int]


def file_key(st: os.stat_result) -> FileKey:
    """A published file's identity in the union (holds while the union is not remounted)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class GraftCache:
    """What one transaction knows of grafting published files. ``clear()`` whenever a
    transaction opens: the union is remounted, and the grafts written are published.

    ``info``: ``graft_info`` per published file. Every chain of a round on the same published
    parent grafts the parent's files again; asking the client for their chunk lists each time
    (three xattr calls through FUSE per file) was 142 s of a 980 s first round of 200 images.

    ``donor``: the graft of that file at that place in its tree which a chain or flat dir of
    this transaction already wrote (``placed``), to be hard-linked with its graft file instead
    of written again -- as a chain links the grafts of a parent built in the same transaction.
    A graft is a hard link only of a graft of the same file at the same path: a hard-link group
    of the parent stays separate grafts, as when written."""

    lookup: Callable[[str, int], GraftInfo | None] = graft_info  # injectable: tests count the calls
    _known: dict[FileKey, GraftInfo | None] = field(default_factory=dict)
    _placed: dict[tuple[FileKey, str], str] = field(default_factory=dict)  # (file, path in tree) -> tree

    def info(self, path: str, st: os.stat_result) -> GraftInfo | None:
        key = file_key(st)
        if key not in self._known:
            self._known[key] = self.lookup(path, st.st_size)
        return self._known[key]

    def placed(self, tree: str | os.PathLike[str], grafts: Iterable[tuple[FileKey, str]]) -> None:
        """``grafts`` (file, path in the tree) were written in ``tree``, now in its place."""
        root = os.fspath(tree)
        for graft in grafts:
            self._placed.setdefault(graft, root)

    def donor(self, st: os.stat_result, rel: str) -> str | None:
        """The path of a graft of the file ``st`` at ``rel`` written in this transaction."""
        root = self._placed.get((file_key(st), rel))
        return None if root is None else os.path.join(root, rel)

    def clear(self) -> None:
        self._known.clear()
        self._placed.clear()


def write_graft(dir_fd: int, name: str, info: GraftInfo) -> None:
    """The empty file ``name`` (mode 0600 until the caller sets its attributes) and its graft file."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    os.close(fd)
    fd = os.open(GRAFT_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        os.write(fd, info.text().encode())
    finally:
        os.close(fd)


__all__ = ["GRAFT_PREFIX", "FileKey", "GraftCache", "GraftInfo", "file_key", "graft_info", "write_graft"]
