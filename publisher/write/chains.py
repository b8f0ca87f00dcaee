"""``.chains/<xx>/<chainid-hex>``: the full root fs of a layer stack (docs/DESIGN.md#chains).

Chain N is built from chain N-1 and layer N's dir in one merged walk, as overlayfs
would show them: directories are created fresh (with the attributes of the
topmost copy), every other entry is a HARD LINK to the inode of the copy that
wins. Nothing linked is ever modified: an entry a layer changes (content, mode,
owner or xattrs alike) is a different inode in the layer dir, so the chain gets a
link to that one instead -- a shared inode is never edited. Deletions (overlay
char-device 0:0 whiteouts, ``trusted.overlay.opaque``, or raw ``.wh.`` files, so
DUCC-written and cvmfs-backend layers work too) are applied by not linking.
When an inode has too many links (EMLINK, 65 000 on ext4) the entry is copied.

With ``grafts`` (the cvmfs backend) a regular file that CernVM-FS already published is not
linked -- through the transaction's union that copies it up and ``publish`` compresses and
hashes it again -- but grafted (publisher/write/grafts.py): an empty file with its owner,
mode and times plus a ``.cvmfsgraft-NAME`` file naming the published content. A graft made
earlier in the same transaction is linked together with its ``.cvmfsgraft-`` file: one in the
parent chain, or one another tree on the same published parent wrote (GraftCache.donor).

Built under ``.tmp/`` and renamed into place (never replacing): a chain dir that
exists is complete.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.oci.digest import Digest, parse_digest
from cvmfs_common.fsutil.fdtree import DirCursor, proc_path
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.repo.lookup import find_chain
from cvmfs_common.fsutil.atomic import publish_dir, remove_tree, syncfs

from publisher.unpack.lowers import read_xattrs
from publisher.write.grafts import GRAFT_PREFIX, FileKey, GraftCache, file_key, graft_info, write_graft
from publisher.unpack.whiteouts import OPAQUE_XATTR, NameKind, classify, is_whiteout_device, whited_out_name

_COPY_CHUNK = 1 << 20

LinkFn = Callable[..., None]


@dataclass
class ChainStats:
    dirs: int = 0
    linked: int = 0
    copied: int = 0
    grafted: int = 0
    deleted: int = 0


class _Source:
    """An entry of a source dir: its name in the directory ``dir_fd`` (valid while
    the walk is in that directory), its type and, when asked, its lstat.

    The lstat is taken only when asked: an entry linked with its ``.cvmfsgraft-`` file (most
    of a tree built on a chain of the same transaction) and the graft file itself need only
    the type readdir gave; one lstat per entry through the union was 1.1 s of 6.6 s of chain
    and flat building (first round of 20 images)."""

    __slots__ = ("dir_fd", "name", "_entry")

    def __init__(self, dir_fd: int, entry: os.DirEntry[str]) -> None:
        self.dir_fd = dir_fd
        self.name = entry.name
        self._entry = entry

    @property
    def st(self) -> os.stat_result:
        return self._entry.stat(follow_symlinks=False)  # the entry keeps it

    @property
    def is_dir(self) -> bool:
        return self._entry.is_dir(follow_symlinks=False)

    @property
    def is_file(self) -> bool:
        return self._entry.is_file(follow_symlinks=False)

    @property
    def maybe_device(self) -> bool:
        """Neither a file, a directory nor a symlink: possibly a whiteout (a character device)."""
        e = self._entry
        return not (e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False) or e.is_symlink())


@dataclass(frozen=True)
class _Child:
    """A subdirectory still to merge: its name, where its attributes come from
    (True: upper), and which sources have it as a directory."""

    name: str
    from_upper: bool
    in_upper: bool
    in_lower: bool


def _scan(cur: DirCursor) -> dict[str, _Source]:
    if not cur.present:
        return {}
    assert cur.fd is not None
    out: dict[str, _Source] = {}
    with os.scandir(cur.fd) as it:
        for e in it:
            out[e.name] = _Source(cur.fd, e)
    return out


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _xattrs(target: int | str) -> dict[str, bytes]:
    """xattrs minus overlay's own, of an open dir (fd) or a non-dir (a /proc/self/fd path)."""
    return read_xattrs(target, skip_overlay=True)


@dataclass
class ChainMerger:
    """Writes ``lower`` (a chain dir, or None) + ``upper`` (a layer dir) into ``out``.

    Any depth: one open directory per tree (cvmfs_common.fsutil.fdtree cursors moving by
    name), an explicit stack of what is left to do, no absolute paths below the top.
    """

    preserve_owners: bool = field(default_factory=lambda: os.geteuid() == 0)
    grafts: bool = False  # cvmfs: graft published files instead of linking them (see above)
    graft_cache: GraftCache | None = None  # the transaction's graft_info answers (grafts.GraftCache)
    # link(src_name, dst_name, *, src_dir_fd, dst_dir_fd, follow_symlinks): injectable, tests force EMLINK
    link: LinkFn = os.link
    stats: ChainStats = field(default_factory=ChainStats)
    # the grafts this merge wrote (file, path in the tree): GraftCache.placed once the tree is in place
    written: list[tuple[FileKey, str]] = field(default_factory=list)
    _copies: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)  # inode -> (dir fd, name)
    _graft_copies: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)  # the same, of grafts
    _path: list[str] = field(default_factory=list)  # the directory being merged, below the top

    def merge(self, out: Path, lower: Path | None, upper: Path) -> ChainStats:
        os.mkdir(out, 0o700)
        with DirCursor.open(out) as dst, DirCursor.open(lower) as low, DirCursor.open(upper) as up:
            try:
                self._walk(dst, low, up)
            finally:
                for copies in (self._copies, self._graft_copies):
                    for fd, _ in copies.values():
                        os.close(fd)
                    copies.clear()
        return self.stats

    def _walk(self, dst: DirCursor, low: DirCursor, up: DirCursor) -> None:
        assert dst.fd is not None and up.fd is not None
        self._dir_attrs(dst.fd, up.fd)
        # One frame per directory on the current path: its subdirectories left, its times.
        frames: list[tuple[list[_Child], tuple[int, int]]] = []
        frames.append((self._merge_dir(dst, low, up), _times(os.fstat(up.fd))))
        while frames:
            todo, times = frames[-1]
            if not todo:
                # Directory times last: creating entries inside changed them.
                assert dst.fd is not None
                os.utime(dst.fd, ns=times)
                frames.pop()
                if frames:
                    self._path.pop()
                    dst.up()
                    low.up()
                    up.up()
                continue
            child = todo.pop()
            up.down(child.name if child.in_upper else None)
            low.down(child.name if child.in_lower else None)
            src = up if child.from_upper else low
            if not src.present:  # replaced by something else since the scan
                raise OSError(errno.ESTALE, f"directory {child.name!r} of a source changed during the merge")
            assert dst.fd is not None and src.fd is not None
            os.mkdir(child.name, 0o700, dir_fd=dst.fd)
            dst.down(child.name)
            self._path.append(child.name)
            assert dst.fd is not None
            self._dir_attrs(dst.fd, src.fd)
            frames.append((self._merge_dir(dst, low, up), _times(os.fstat(src.fd))))

    def _merge_dir(self, dst: DirCursor, low: DirCursor, up: DirCursor) -> list[_Child]:
        """Place the non-directories of one directory; returns its subdirectories."""
        assert dst.fd is not None
        plain: dict[str, _Source] = {}
        deleted: set[str] = set()
        opaque = up.present and up.fd is not None and _is_opaque(up.fd)
        up_entries, up_marks = self._split_marks(_scan(up))
        for name, src in up_entries.items():
            kind = classify(name)
            if kind is NameKind.OPAQUE:
                opaque = True
            elif kind is NameKind.WHITEOUT:
                deleted.add(whited_out_name(name))
            elif kind is NameKind.META:
                continue
            elif src.maybe_device and is_whiteout_device(src.st):
                deleted.add(name)
            else:
                plain[name] = src
        below, low_marks = ({}, {}) if opaque else self._split_marks(_scan(low))
        if opaque:
            self.stats.deleted += 1
        subdirs: list[_Child] = []
        for name in sorted(plain.keys() | below.keys(), reverse=True):  # popped in order
            if name in plain:
                src = plain[name]
                if src.is_dir:
                    low_src = below.get(name) if name not in deleted else None
                    merge_lower = low_src is not None and low_src.is_dir
                    subdirs.append(_Child(name, True, True, merge_lower))
                else:
                    self._place(src, dst.fd, name, up_marks.get(GRAFT_PREFIX + name))
            elif name in deleted:
                self.stats.deleted += 1
            else:
                src = below[name]
                if src.is_dir:
                    subdirs.append(_Child(name, False, False, True))
                else:
                    self._place(src, dst.fd, name, low_marks.get(GRAFT_PREFIX + name))
        return subdirs

    def _split_marks(self, entries: dict[str, _Source]) -> tuple[dict[str, _Source], dict[str, _Source]]:
        """With grafts: the ``.cvmfsgraft-`` files apart; they go only with their file."""
        if not self.grafts:
            return entries, {}
        marks = {n: s for n, s in entries.items() if n.startswith(GRAFT_PREFIX)}
        return ({n: s for n, s in entries.items() if n not in marks}, marks) if marks else (entries, {})

    # -- entries -----------------------------------------------------------------------
    def _dir_attrs(self, fd: int, src_fd: int) -> None:
        st = os.fstat(src_fd)
        self._attrs(st, _xattrs(src_fd), lambda n, v: os.setxattr(fd, n, v), lambda m: os.fchmod(fd, m),
                    lambda u, g: os.fchown(fd, u, g))
        self.stats.dirs += 1

    def _place(self, src: _Source, out_fd: int, name: str, mark: _Source | None = None) -> None:
        if mark is not None:  # a graft made in this transaction: the file and its graft file
            self.link(mark.name, mark.name, src_dir_fd=mark.dir_fd, dst_dir_fd=out_fd, follow_symlinks=False)
        elif self.grafts and src.is_file and src.st.st_size > 0:
            rel = "/".join((*self._path, name))
            if self.graft_cache is not None and self._link_donor(src.st, out_fd, name, rel):
                self.stats.grafted += 1
                return
            path = proc_path(src.dir_fd, src.name)
            info = (self.graft_cache.info(path, src.st) if self.graft_cache is not None
                    else graft_info(path, src.st.st_size))
            if info is not None and len(GRAFT_PREFIX + name) <= 255:
                write_graft(out_fd, name, info)
                self._attrs(src.st, {}, lambda n, v: None, lambda m: os.chmod(name, m, dir_fd=out_fd),
                            lambda u, g: os.chown(name, u, g, dir_fd=out_fd))
                os.utime(name, ns=_times(src.st), dir_fd=out_fd)
                if self.graft_cache is not None:
                    self.written.append((file_key(src.st), rel))
                self.stats.grafted += 1
                return
        # A graft of this transaction (mark) is an inode none of the other entries has: they
        # are linked or written anew without a graft file. Its own copies are apart, so that
        # its lstat is taken only once a graft was copied (EMLINK).
        copies = self._copies if mark is None else self._graft_copies
        if (self.grafts and mark is None and (stat.S_ISLNK(src.st.st_mode) or stat.S_ISFIFO(src.st.st_mode)
                                              or (stat.S_ISREG(src.st.st_mode) and src.st.st_size == 0))
                and (src.st.st_dev, src.st.st_ino) not in copies):
            # Written anew, never linked: a link to a published entry copies it up with its
            # parent dirs, and publish then rewrites the catalog of the tree it came from
            # (a known base chain's, for every new image). These have no content to hash.
            self._copy(src, out_fd, name)
            copies[(src.st.st_dev, src.st.st_ino)] = (os.dup(out_fd), name)
            self.stats.copied += 1
            return
        # keep hardlink groups together after a copy (none copied: no lstat needed)
        from_fd, from_name = (copies.get((src.st.st_dev, src.st.st_ino), (src.dir_fd, src.name))
                              if copies else (src.dir_fd, src.name))
        try:
            self.link(from_name, name, src_dir_fd=from_fd, dst_dir_fd=out_fd, follow_symlinks=False)
            self.stats.linked += 1
            return
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
        self._copy(src, out_fd, name)
        copies[(src.st.st_dev, src.st.st_ino)] = (os.dup(out_fd), name)
        self.stats.copied += 1

    def _link_donor(self, st: os.stat_result, out_fd: int, name: str, rel: str) -> bool:
        """Link the graft of this file another tree of the transaction wrote, with its graft
        file; False (nothing placed) when there is none or it is not what a graft here would be."""
        assert self.graft_cache is not None
        donor = self.graft_cache.donor(st, rel)
        if donor is None:
            return False
        try:
            have = os.lstat(donor)
        except FileNotFoundError:
            return False
        if not (stat.S_ISREG(have.st_mode) and have.st_size == 0 and have.st_mode == st.st_mode
                and have.st_mtime_ns == st.st_mtime_ns
                and (not self.preserve_owners or (have.st_uid, have.st_gid) == (st.st_uid, st.st_gid))):
            return False
        head, tail = os.path.split(donor)
        try:
            self.link(donor, name, src_dir_fd=None, dst_dir_fd=out_fd, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EMLINK, errno.ENOENT):
                return False
            raise
        try:
            self.link(os.path.join(head, GRAFT_PREFIX + tail), GRAFT_PREFIX + name, src_dir_fd=None,
                      dst_dir_fd=out_fd, follow_symlinks=False)
        except OSError as e:
            os.unlink(name, dir_fd=out_fd)  # never a file without its graft file
            if e.errno in (errno.EMLINK, errno.ENOENT):
                return False
            raise
        return True

    def _copy(self, src: _Source, out_fd: int, name: str) -> None:
        mode = src.st.st_mode
        times = _times(src.st)
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src.name, dir_fd=src.dir_fd), name, dir_fd=out_fd)
            dst = proc_path(out_fd, name)  # no lsetxattr with a dir fd
            self._attrs(src.st, _xattrs(proc_path(src.dir_fd, src.name)),
                        lambda n, v: os.setxattr(dst, n, v, follow_symlinks=False), None,
                        lambda u, g: os.chown(name, u, g, dir_fd=out_fd, follow_symlinks=False))
            os.utime(name, ns=times, dir_fd=out_fd, follow_symlinks=False)
            return
        if stat.S_ISFIFO(mode):
            os.mkfifo(name, 0o600, dir_fd=out_fd)
            dst = proc_path(out_fd, name)  # no setxattr/chmod with a dir fd; a FIFO is never opened
            self._attrs(src.st, _xattrs(proc_path(src.dir_fd, src.name)),
                        lambda n, v: os.setxattr(dst, n, v, follow_symlinks=False),
                        lambda m: os.chmod(dst, m), lambda u, g: os.chown(name, u, g, dir_fd=out_fd,
                                                                          follow_symlinks=False))
            os.utime(name, ns=times, dir_fd=out_fd, follow_symlinks=False)
            return
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"cannot copy {stat.filemode(mode)} entry", src.name)
        fin = os.open(src.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src.dir_fd)
        try:
            fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=out_fd)
            try:
                _copy_data(fin, fout, src.st.st_size)
                self._attrs(src.st, _xattrs(fin), lambda n, v: os.setxattr(fout, n, v),
                            lambda m: os.fchmod(fout, m), lambda u, g: os.fchown(fout, u, g))
                os.utime(fout, ns=times)
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    def _attrs(self, st: os.stat_result, xattrs: dict[str, bytes], setx: Callable[[str, bytes], None],
               chmod: Callable[[int], None] | None, chown: Callable[[int, int], None]) -> None:
        # chown first (clears setuid and capabilities), xattrs, chmod last (ACLs rewrite group bits).
        if self.preserve_owners:
            chown(st.st_uid, st.st_gid)
        for name, value in xattrs.items():
            setx(name, value)
        if chmod is not None:
            chmod(stat.S_IMODE(st.st_mode))


def _times(st: os.stat_result) -> tuple[int, int]:
    return st.st_atime_ns, st.st_mtime_ns


def _copy_data(fin: int, fout: int, size: int) -> None:
    left = size
    while left > 0:
        try:
            n = os.copy_file_range(fin, fout, min(left, 1 << 30))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
            while chunk := os.read(fin, _COPY_CHUNK):
                os.write(fout, chunk)
            return
        if n == 0:
            break
        left -= n


def build_chain(layout: RepositoryLayout, chain_id: str | Digest, parent: Path | None, layer_dir: Path,
                merger: ChainMerger | None = None, durable: bool = True) -> tuple[Path, ChainStats | None]:
    """Publish ``.chains/<xx>/<chain_id>`` = ``parent`` chain + ``layer_dir``.

    ``durable``: synced before the rename (Backend.durable_renames).

    Returns (chain dir, stats); stats is None when the chain already existed.
    """
    chain_id = parse_digest(chain_id)
    existing = find_chain(layout, chain_id)
    if existing is not None:
        return existing, None
    dest = layout.chain_dir(chain_id)
    work = layout.make_work_dir("chain-")
    try:
        root = work / "rootfs"
        merger = merger or ChainMerger()
        stats = merger.merge(root, parent, layer_dir)
        if durable:
            syncfs(work)  # data on disk before the rename makes it visible
        if publish_dir(root, dest, layout.root, durable=durable) and merger.graft_cache is not None:
            merger.graft_cache.placed(dest, merger.written)
        # (False: someone else published the same chain first; fine)
    finally:
        remove_tree(work)
    return dest, stats
