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
from collections.abc import Callable
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


@dataclass
class GraftCache:
    """``graft_info`` per published file, for one transaction. Every chain of a round on the
    same published parent grafts the parent's files again; asking the client for their
    chunk lists each time (three xattr calls through FUSE per file) was 142 s of a 980 s
    first round of 200 images. Keyed by the file's identity in the union, which holds only
    while the union is not remounted: ``clear()`` whenever a transaction opens."""

    lookup: Callable[[str, int], GraftInfo | None] = graft_info  # injectable: tests count the calls
    _known: dict[tuple[int, ...], GraftInfo | None] = field(default_factory=dict)

    def info(self, path: str, st: os.stat_result) -> GraftInfo | None:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in self._known:
            self._known[key] = self.lookup(path, st.st_size)
        return self._known[key]

    def clear(self) -> None:
        self._known.clear()


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


__all__ = ["GRAFT_PREFIX", "GraftCache", "GraftInfo", "graft_info", "write_graft"]
