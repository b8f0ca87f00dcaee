"""``.chains/<xx>/<chainid-hex>``: the full root fs of a layer stack (DESIGN §2).

Chain N is built from chain N-1 and layer N's dir in one merged walk, as overlayfs
would show them: directories are created fresh (with the attributes of the
topmost copy), every other entry is a HARD LINK to the inode of the copy that
wins. Nothing linked is ever modified: an entry a layer changes (content, mode,
owner or xattrs alike) is a different inode in the layer dir, so the chain gets a
link to that one instead -- a shared inode is never edited. Deletions (overlay
char-device 0:0 whiteouts, ``trusted.overlay.opaque``, or raw ``.wh.`` files, so
DUCC-written and cvmfs-backend layers work too) are applied by not linking.
When an inode has too many links (EMLINK, 65 000 on ext4) the entry is copied.

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

from cvmfs_common.digest import Digest, parse_digest
from cvmfs_common.layout import RepositoryLayout, find_chain, publish_dir, remove_tree, syncfs

from .lowers import read_xattrs
from .whiteouts import OPAQUE_XATTR, NameKind, classify, is_whiteout_device, whited_out_name

_COPY_CHUNK = 1 << 20

LinkFn = Callable[..., None]


@dataclass
class ChainStats:
    dirs: int = 0
    linked: int = 0
    copied: int = 0
    deleted: int = 0


@dataclass
class _Source:
    path: Path
    st: os.stat_result


def _scan(path: Path | None) -> dict[str, _Source]:
    if path is None:
        return {}
    out: dict[str, _Source] = {}
    with os.scandir(path) as it:
        for e in it:
            out[e.name] = _Source(Path(e.path), e.stat(follow_symlinks=False))
    return out


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


@dataclass
class ChainMerger:
    """Writes ``lower`` (a chain dir, or None) + ``upper`` (a layer dir) into ``out``."""

    preserve_owners: bool = field(default_factory=lambda: os.geteuid() == 0)
    link: LinkFn = os.link  # injectable: tests force EMLINK
    stats: ChainStats = field(default_factory=ChainStats)
    _copies: dict[tuple[int, int], Path] = field(default_factory=dict)
    _dir_times: list[tuple[Path, int, int]] = field(default_factory=list)

    def merge(self, out: Path, lower: Path | None, upper: Path) -> ChainStats:
        top = _Source(upper, os.lstat(upper))
        self._mkdir(out, top)
        stack: list[tuple[Path, Path | None, Path | None]] = [(out, lower, upper)]
        while stack:
            self._merge_dir(*stack.pop(), stack)
        # Directory times last: creating entries inside changed them.
        for path, atime, mtime in reversed(self._dir_times):
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return self.stats

    def _merge_dir(self, out: Path, lower: Path | None, upper: Path | None,
                   stack: list[tuple[Path, Path | None, Path | None]]) -> None:
        plain: dict[str, _Source] = {}
        deleted: set[str] = set()
        opaque = upper is not None and _is_opaque(upper)
        for name, src in _scan(upper).items():
            kind = classify(name)
            if kind is NameKind.OPAQUE:
                opaque = True
            elif kind is NameKind.WHITEOUT:
                deleted.add(whited_out_name(name))
            elif kind is NameKind.META:
                continue
            elif is_whiteout_device(src.st):
                deleted.add(name)
            else:
                plain[name] = src
        below = {} if opaque else _scan(lower)
        if opaque:
            self.stats.deleted += 1
        for name in sorted(plain.keys() | below.keys()):
            dst = out / name
            if name in plain:
                src = plain[name]
                if stat.S_ISDIR(src.st.st_mode):
                    self._mkdir(dst, src)
                    low = below.get(name) if name not in deleted else None
                    merge_lower = low.path if low is not None and stat.S_ISDIR(low.st.st_mode) else None
                    stack.append((dst, merge_lower, src.path))
                else:
                    self._place(src, dst)
            elif name in deleted:
                self.stats.deleted += 1
            else:
                src = below[name]
                if stat.S_ISDIR(src.st.st_mode):
                    self._mkdir(dst, src)
                    stack.append((dst, src.path, None))
                else:
                    self._place(src, dst)

    # -- entries -----------------------------------------------------------------------
    def _mkdir(self, dst: Path, src: _Source) -> None:
        os.mkdir(dst, 0o700)
        fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            self._attrs(fd, src, lambda n, v: os.setxattr(fd, n, v), lambda m: os.fchmod(fd, m),
                        lambda u, g: os.fchown(fd, u, g))
        finally:
            os.close(fd)
        self._dir_times.append((dst, src.st.st_atime_ns, src.st.st_mtime_ns))
        self.stats.dirs += 1

    def _place(self, src: _Source, dst: Path) -> None:
        key = (src.st.st_dev, src.st.st_ino)
        target = self._copies.get(key, src.path)  # keep hardlink groups together after a copy
        try:
            self.link(target, dst, follow_symlinks=False)
            self.stats.linked += 1
            return
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
        self._copy(src, dst)
        self._copies[key] = dst
        self.stats.copied += 1

    def _copy(self, src: _Source, dst: Path) -> None:
        mode = src.st.st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src.path), dst)
            self._attrs(None, src, lambda n, v: os.setxattr(dst, n, v, follow_symlinks=False), None,
                        lambda u, g: os.chown(dst, u, g, follow_symlinks=False))
            os.utime(dst, ns=(src.st.st_atime_ns, src.st.st_mtime_ns), follow_symlinks=False)
            return
        if stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
            self._attrs(None, src, lambda n, v: os.setxattr(dst, n, v, follow_symlinks=False),
                        lambda m: os.chmod(dst, m), lambda u, g: os.chown(dst, u, g, follow_symlinks=False))
            os.utime(dst, ns=(src.st.st_atime_ns, src.st.st_mtime_ns), follow_symlinks=False)
            return
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"cannot copy {stat.filemode(mode)} entry", str(src.path))
        fin = os.open(src.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_data(fin, fout, src.st.st_size)
                self._attrs(fout, src, lambda n, v: os.setxattr(fout, n, v), lambda m: os.fchmod(fout, m),
                            lambda u, g: os.fchown(fout, u, g))
                os.utime(fout, ns=(src.st.st_atime_ns, src.st.st_mtime_ns))
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    def _attrs(self, fd: int | None, src: _Source, setx: Callable[[str, bytes], None],
               chmod: Callable[[int], None] | None, chown: Callable[[int, int], None]) -> None:
        # chown first (clears setuid and capabilities), xattrs, chmod last (ACLs rewrite group bits).
        if self.preserve_owners:
            chown(src.st.st_uid, src.st.st_gid)
        for name, value in read_xattrs(src.path, skip_overlay=True).items():
            setx(name, value)
        if chmod is not None:
            chmod(stat.S_IMODE(src.st.st_mode))


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
                merger: ChainMerger | None = None) -> tuple[Path, ChainStats | None]:
    """Publish ``.chains/<xx>/<chain_id>`` = ``parent`` chain + ``layer_dir``.

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
        syncfs(work)  # data on disk before the rename makes it visible
        publish_dir(root, dest)  # False: someone else published the same chain first; fine
    finally:
        remove_tree(work)
    return dest, stats
