"""Creates tar members below a root directory with fd-relative system calls only.

Every parent is opened with O_NOFOLLOW|O_DIRECTORY relative to its own parent, starting at
the root's fd, so no member can reach outside the root or write through a symlink the layer
itself planted. Nothing is ever extracted by tarfile: it only parses.
"""
from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.fsutil.fdtree import remove_tree_at

from publisher.unpack.layererrors import HostileLayerError, LayerError
from publisher.unpack.lowers import LowerEntry, LowerView
from publisher.unpack.streams import CHUNK, TarSource
from publisher.unpack.tarsafety import Limits, UnsafePath, member_parts, member_times_ns, member_xattrs
from publisher.unpack.whiteouts import (OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, OVERLAY_XATTR_PREFIXES, NameKind,
    WhiteoutMode, classify, whited_out_name)

Parts = tuple[str, ...]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64            # open parent dirs kept; members usually arrive grouped by directory
_MAX_HOPS = 40            # lower-chain symlinks followed for one path (Linux: 40)
_ZEROS = bytes(CHUNK)     # an all-zero chunk becomes a hole
_HOLE_MIN = 64 << 10      # ... and so does an all-zero piece of the stream this long
_FATAL_XATTR_ERRNOS = frozenset((errno.EIO, errno.EDQUOT, errno.EROFS, errno.EBADF))
_DEFAULT_DIR_MODE = 0o755


@dataclass
class EntryCounts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaques: int = 0
    fifos: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class SkippedEntry:
    member: str
    reason: str


@dataclass
class _Redirect:
    """A missing component is a symlink in the lower chain: resolve again at `parts`."""
    parts: Parts


def scoped_join(base: Parts, target: str) -> Parts:
    """Resolve a symlink `target` found in directory `base` without leaving the root
    (securejoin semantics, as containerd's fs.RootPath applies them)."""
    parts = [] if target.startswith("/") else list(base)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
        else:
            parts.append(comp)
    return tuple(parts)


def _path(parts: Parts) -> str:
    return "/" + "/".join(parts)


@dataclass
class TreeWriter:
    """Applies one layer's members below `root_fd` (which it does not own)."""
    root_fd: int
    root_path: Path
    layer: str
    mode: WhiteoutMode
    lowers: LowerView
    limits: Limits
    preserve_owners: bool
    counts: EntryCounts = field(default_factory=EntryCounts)
    skipped: list[SkippedEntry] = field(default_factory=list)
    entries: int = 0
    file_bytes: int = 0
    saw_whiteouts: bool = False
    followed_lower_symlinks: list[str] = field(default_factory=list)
    member: str | None = None
    source: TarSource | None = None   # file data straight from the stream (else tarfile's)
    _fds: OrderedDict[Parts, int] = field(default_factory=OrderedDict)
    _dir_times: dict[Parts, tuple[int, int]] = field(default_factory=dict)
    _implicit: dict[Parts, bool] = field(default_factory=dict)   # dir -> attrs from a lower
    _wh_devices: set[Parts] = field(default_factory=set)
    _root_attrs_done: bool = False

    def __post_init__(self) -> None:
        # Our own tree on top: its whiteouts and opaque dirs hide what the lowers have.
        self._view = LowerView([self.root_path, *self.lowers.dirs])

    # ---------------------------------------------------------------- errors
    def hostile(self, message: str) -> HostileLayerError:
        return HostileLayerError(self.layer, message, self.member)

    def bad(self, message: str) -> LayerError:
        return LayerError(self.layer, message, self.member)

    def skip(self, reason: str) -> None:
        self.counts.skipped += 1
        self.skipped.append(SkippedEntry(self.member or "", reason))

    # ---------------------------------------------------------------- results
    @property
    def implicit_parents(self) -> tuple[str, ...]:
        return tuple(sorted(_path(p) for p in self._implicit))

    @property
    def parents_from_lower(self) -> tuple[str, ...]:
        return tuple(sorted(_path(p) for p, lower in self._implicit.items() if lower))

    def close(self) -> None:
        self._view.forget()
        self.lowers.forget()
        while self._fds:
            os.close(self._fds.popitem()[1])

    # ---------------------------------------------------------------- members
    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.member = member.name
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise self.hostile(f"more than {self.limits.max_entries} entries")
        try:
            parts = member_parts(member.name, self.limits.max_member_name)
        except UnsafePath as exc:
            raise self.hostile(str(exc)) from None
        times = member_times_ns(member)
        if not self._root_attrs_done:
            self._init_root(times[1])
        if not parts:
            if not member.isdir():
                raise self.hostile("the layer root is not a directory")
            _drop_stale_xattrs(self.root_fd, member)
            self._apply_dir_attrs(self.root_fd, member)
            self._implicit.pop((), None)
            self._dir_times[()] = times
            self.counts.dirs += 1
            return
        kind = classify(parts[-1])
        if kind is NameKind.META:
            self.skip("aufs metadata entry")
            return
        if kind is not NameKind.PLAIN:
            self.saw_whiteouts = True
            if kind is NameKind.OPAQUE:
                self.counts.opaques += 1
            else:
                self.counts.whiteouts += 1
            if self.mode is WhiteoutMode.OVERLAY:
                self._overlay_whiteout(kind, parts, member, times)
                return
        self._entry(tar, parts, member, times)

    def _entry(self, tar: tarfile.TarFile, parts: Parts, member: tarfile.TarInfo,
               times: tuple[int, int]) -> None:
        if member.ischr() or member.isblk():
            # Containers get /dev from the runtime; FIFOs are kept (docs/DESIGN.md#layout).
            self.skip(f"{'character' if member.ischr() else 'block'} device not allowed in a repository")
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            self.skip(f"unsupported tar entry type {member.type!r}")
            return
        if member.islnk():
            self._hardlink(parts, member)
            return
        if member.isreg() and not 0 <= member.size <= self.limits.max_total_bytes - self.file_bytes:
            raise self.hostile(f"declared size {member.size} exceeds the limit of "
                               f"{self.limits.max_total_bytes} bytes for the layer")
        parent_fd, pparts = self._dir(parts[:-1], create=True, mtime=times[1])
        name = parts[-1]
        parts = pparts + (name,)
        if member.isreg():
            # Most members are new files: create first, look only when the name is taken
            # (saves a failing lstat per file).
            fd = _create_file(parent_fd, name)
            if fd is not None:
                self._file(tar, fd, member, times)
                return
        existing = _lstat_at(parent_fd, name)
        reuse = existing is not None and member.isdir() and stat.S_ISDIR(existing.st_mode)
        replaced_whiteout = False
        if existing is not None and not reuse:
            replaced_whiteout = self._remove(parent_fd, name, parts, existing)
        if member.isreg():
            fd = _create_file(parent_fd, name)
            if fd is None:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name)
            self._file(tar, fd, member, times)
        elif member.isdir():
            self._mkdir(parent_fd, name, parts, member, times, reuse, replaced_whiteout)
        elif member.isfifo():
            self._fifo(parent_fd, name, member, times)
        else:
            self._symlink(parent_fd, name, member, times)

    # ---------------------------------------------------------------- entry kinds
    def _file(self, tar: tarfile.TarFile, fd: int, member: tarfile.TarInfo,
              times: tuple[int, int]) -> None:
        """Fill the file just created as `fd` (closed here)."""
        try:
            self._copy_data(tar, member, fd)
            self._apply_attrs(fd, member, lambda n, v: os.setxattr(fd, n, v),
                              lambda m: os.fchmod(fd, m))
            os.utime(fd, ns=times)
        finally:
            os.close(fd)
        self.file_bytes += member.size
        self.counts.files += 1

    def _copy_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        if self.source is not None and not member.issparse():
            self.source.seek(member.offset_data)
            pieces: Iterator[memoryview | bytes] = self.source.pieces(member.size)
        else:
            src = tar.extractfile(member)
            assert src is not None
            pieces = iter(lambda: src.read(CHUNK), b"")
        written = 0
        hole = False
        for piece in pieces:
            n = len(piece)
            if n >= _HOLE_MIN and not piece[0] and not piece[-1] and _all_zeros(piece):
                os.lseek(fd, n, os.SEEK_CUR)   # keep sparse images sparse
                hole = True
            else:
                view = piece if isinstance(piece, memoryview) else memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
                hole = False
            written += n
        if written != member.size:
            raise self.bad(f"malformed layer: unexpected end of data "
                           f"(file data ends after {written} of {member.size} bytes)")
        if hole:
            os.ftruncate(fd, written)

    def _fifo(self, parent_fd: int, name: str, member: tarfile.TarInfo, times: tuple[int, int]) -> None:
        os.mkfifo(name, 0o600, dir_fd=parent_fd)
        # O_NONBLOCK: opening a FIFO for reading does not wait for a writer then.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            self._apply_attrs(fd, member, lambda n, v: os.setxattr(fd, n, v), lambda m: os.fchmod(fd, m))
            os.utime(fd, ns=times)
        finally:
            os.close(fd)
        self.counts.fifos += 1

    def _mkdir(self, parent_fd: int, name: str, parts: Parts, member: tarfile.TarInfo,
               times: tuple[int, int], reuse: bool, replaced_whiteout: bool) -> None:
        if not reuse:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = self._open_dir_at(parent_fd, name, parts)
        if reuse:
            # An earlier entry or an implicit parent: the tar's attributes are now the truth.
            self._implicit.pop(parts, None)
            _drop_stale_xattrs(fd, member)
        if replaced_whiteout:
            # The layer deletes the lower dir and creates a new one: hide the lower contents.
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        self._apply_dir_attrs(fd, member)
        self._dir_times[parts] = times
        self.counts.dirs += 1

    def _symlink(self, parent_fd: int, name: str, member: tarfile.TarInfo,
                 times: tuple[int, int]) -> None:
        target = member.linkname
        if len(target.encode("utf-8", "surrogateescape")) > self.limits.max_path_length:
            raise self.hostile("symlink target too long")
        os.symlink(target, name, dir_fd=parent_fd)
        if self.preserve_owners:
            os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        proc = f"/proc/self/fd/{parent_fd}/{name}"   # no lsetxattr with a dir fd
        self._set_xattrs(member, lambda n, v: os.setxattr(proc, n, v, follow_symlinks=False))
        os.utime(name, ns=times, dir_fd=parent_fd, follow_symlinks=False)
        self.counts.symlinks += 1

    def _hardlink(self, parts: Parts, member: tarfile.TarInfo) -> None:
        try:
            target = member_parts(member.linkname, self.limits.max_member_name)
        except UnsafePath as exc:
            raise self.hostile(f"hard link target {member.linkname!r}: {exc}") from None
        if not target:
            raise self.hostile("hard link to the layer root")
        found = self._dir(target[:-1], create=False, mtime=0)
        if found is None:
            raise self.hostile(f"hard link to {member.linkname!r}, which the layer does not contain")
        # Our own fd: resolving the link's parent below may evict cached fds.
        tfd = os.dup(found[0])
        try:
            tparts = found[1] + (target[-1],)
            tst = _lstat_at(tfd, target[-1])
            if tst is None or tparts in self._wh_devices:
                raise self.hostile(f"hard link to {member.linkname!r}, which the layer "
                                   "does not contain (yet)")
            if stat.S_ISDIR(tst.st_mode):
                raise self.hostile(f"hard link to directory {member.linkname!r}")
            parent_fd, pparts = self._dir(parts[:-1], create=True, mtime=member_times_ns(member)[1])
            name = parts[-1]
            existing = _lstat_at(parent_fd, name)
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (tst.st_dev, tst.st_ino):
                    return          # already that inode (e.g. a link to itself)
                self._remove(parent_fd, name, pparts + (name,), existing)
            try:
                os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.EMLINK:
                    raise self.bad(f"too many hard links to {member.linkname!r}") from None
                raise
        finally:
            os.close(tfd)
        self.counts.hardlinks += 1

    def _overlay_whiteout(self, kind: NameKind, parts: Parts, member: tarfile.TarInfo,
                          times: tuple[int, int]) -> None:
        parent_fd, pparts = self._dir(parts[:-1], create=True, mtime=times[1])
        if kind is NameKind.OPAQUE:
            os.setxattr(parent_fd, OPAQUE_XATTR, b"y")
            return
        name = whited_out_name(parts[-1])
        if name in ("", ".", "..") or "/" in name:
            raise self.hostile(f"whiteout for {name!r}")
        existing = _lstat_at(parent_fd, name)
        if existing is not None:
            # OCI: a whiteout only deletes from the layers below; this layer's own entry
            # stays, and if it is a directory the lower one must not show through it.
            if stat.S_ISDIR(existing.st_mode):
                fd = self._open_dir_at(parent_fd, name, pparts + (name,))
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            return
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent_fd)
        if self.preserve_owners:
            os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        os.utime(name, ns=times, dir_fd=parent_fd, follow_symlinks=False)
        self._wh_devices.add(pparts + (name,))

    # ---------------------------------------------------------------- attributes
    def _apply_attrs(self, fd: int, member: tarfile.TarInfo,
                     setx: Callable[[str, bytes], None], chmod: Callable[[int], None]) -> None:
        # chown first (it clears setuid bits and file capabilities), xattrs next (a
        # capability needs the final owner), chmod last (an ACL rewrites the group bits).
        if self.preserve_owners:
            os.fchown(fd, member.uid, member.gid)
        self._set_xattrs(member, setx)
        chmod(member.mode & 0o7777)

    def _apply_dir_attrs(self, fd: int, member: tarfile.TarInfo) -> None:
        self._apply_attrs(fd, member, lambda n, v: os.setxattr(fd, n, v),
                          lambda m: os.fchmod(fd, m))

    def _set_xattrs(self, member: tarfile.TarInfo, setx: Callable[[str, bytes], None]) -> None:
        for name, value in member_xattrs(member).items():
            if name.startswith(OVERLAY_XATTR_PREFIXES):
                # Would forge whiteouts/redirects in a lower layer: never taken from a tar.
                self.skip(f"xattr {name} not allowed")
                continue
            try:
                setx(name, value)
            except OSError as exc:
                if exc.errno in _FATAL_XATTR_ERRNOS:
                    raise
                self.skip(f"xattr {name}: {exc.strerror}")

    def _copy_lower_attrs(self, fd: int, lower: LowerEntry) -> None:
        st = lower.st
        if self.preserve_owners:
            os.fchown(fd, st.st_uid, st.st_gid)
        for name, value in lower.xattrs().items():
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                if exc.errno in _FATAL_XATTR_ERRNOS:
                    raise
                self.skip(f"xattr {name} of the parent chain: {exc.strerror}")
        os.fchmod(fd, stat.S_IMODE(st.st_mode))

    def _default_dir_attrs(self, fd: int) -> None:
        if self.preserve_owners:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, _DEFAULT_DIR_MODE)

    def _init_root(self, mtime: int) -> None:
        """A layer without a `./` entry leaves the root unchanged (OCI changeset
        semantics, as umoci applies them): it takes the chain's root, else 0755 root:root."""
        self._root_attrs_done = True
        lower = self.lowers.lookup(()) if self.lowers else None
        if lower is not None:
            self._copy_lower_attrs(self.root_fd, lower)
            self._dir_times[()] = (lower.st.st_atime_ns, lower.st.st_mtime_ns)
            st = lower.st
            if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (_DEFAULT_DIR_MODE, 0, 0) \
                    or lower.xattrs():
                # Only an unusual root ties the layer to its chain (mtimes aside, every
                # chain root looks the same: 0755 root:root).
                self._implicit[()] = True
        else:
            self._default_dir_attrs(self.root_fd)
            self._dir_times[()] = (mtime, mtime)

    # ---------------------------------------------------------------- directories
    def _dir(self, parts: Parts, *, create: bool, mtime: int) -> tuple[int, Parts] | None:
        """fd of directory `parts` (borrowed from the cache) and its resolved path.

        Missing directories are created when `create` (attributes from the lowers) or give
        None; a missing one that is a symlink in the lowers is followed inside the root."""
        for _ in range(_MAX_HOPS):
            found = self._walk(parts, create, mtime)
            if not isinstance(found, _Redirect):
                return found
            parts = found.parts
        raise self.bad(f"too many levels of symbolic links in the parent chain for {_path(parts)}")

    def _walk(self, parts: Parts, create: bool, mtime: int) -> tuple[int, Parts] | None | _Redirect:
        self._view.forget()  # our own tree changed since the last walk
        depth = len(parts)
        while depth and parts[:depth] not in self._fds:
            depth -= 1
        cur = self.root_fd
        if depth:
            cur = self._fds[parts[:depth]]
            self._fds.move_to_end(parts[:depth])
        for i in range(depth, len(parts)):
            prefix = parts[: i + 1]
            comp = parts[i]
            try:
                cur = self._open_dir_at(cur, comp, prefix)
                continue
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise self.hostile(f"path goes through symlink {_path(prefix)}") from None
                if not (create and prefix in self._wh_devices):
                    raise self.bad(f"{_path(prefix)} is not a directory") from None
                # Entries below a name this layer whited out: a fresh, opaque directory.
                self._remove(cur, comp, prefix, st)
                cur = self._implicit_dir(cur, comp, prefix, None, mtime)
                os.setxattr(cur, OPAQUE_XATTR, b"y")
                continue
            lower = self._view.lookup(prefix) if self.lowers else None
            if lower is not None and lower.is_symlink:
                self.followed_lower_symlinks.append(_path(prefix))
                assert lower.link_target is not None
                return _Redirect(scoped_join(parts[:i], lower.link_target) + parts[i + 1:])
            if not create:
                return None
            cur = self._implicit_dir(cur, comp, prefix, lower, mtime)
        return cur, parts

    def _implicit_dir(self, parent_fd: int, name: str, parts: Parts,
                      lower: LowerEntry | None, mtime: int) -> int:
        """A parent the layer omits: as the topmost lower has it, else 0755 root:root."""
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = self._open_dir_at(parent_fd, name, parts)
        from_lower = lower is not None and lower.is_dir
        if from_lower:
            assert lower is not None
            self._copy_lower_attrs(fd, lower)
            self._dir_times[parts] = (lower.st.st_atime_ns, lower.st.st_mtime_ns)
        else:
            self._default_dir_attrs(fd)
            self._dir_times[parts] = (mtime, mtime)
        self._implicit[parts] = from_lower
        return fd

    def _open_dir_at(self, parent_fd: int, name: str, parts: Parts) -> int:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        old = self._fds.pop(parts, None)
        if old is not None:
            os.close(old)
        self._fds[parts] = fd
        while len(self._fds) > _FD_CACHE:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _remove(self, parent_fd: int, name: str, parts: Parts, st: os.stat_result) -> bool:
        """Remove an earlier entry a new one replaces; True if it was our whiteout device."""
        if stat.S_ISDIR(st.st_mode):
            self._forget_below(parts)
            remove_tree_at(parent_fd, name)
        else:
            os.unlink(name, dir_fd=parent_fd)
        if parts in self._wh_devices:
            self._wh_devices.discard(parts)
            return True
        return False

    def _forget_below(self, parts: Parts) -> None:
        n = len(parts)
        for key in [k for k in self._fds if k[:n] == parts]:
            os.close(self._fds.pop(key))
        for table in (self._dir_times, self._implicit):
            for key in [k for k in table if k[:n] == parts]:
                del table[key]
        self._wh_devices = {k for k in self._wh_devices if k[:n] != parts}

    # ---------------------------------------------------------------- the end
    def finish(self) -> None:
        """Directory times last: creating their contents changed them."""
        for parts in sorted(self._dir_times, key=len, reverse=True):
            if not parts:
                os.utime(self.root_fd, ns=self._dir_times[parts])
                continue
            found = self._dir(parts, create=False, mtime=0)
            if found is not None:
                os.utime(found[0], ns=self._dir_times[parts])


def _drop_stale_xattrs(fd: int, member: tarfile.TarInfo) -> None:
    for stale in set(os.listxattr(fd)) - set(member_xattrs(member)):
        if not stale.startswith(OVERLAY_XATTR_PREFIX):
            os.removexattr(fd, stale)


def _all_zeros(piece: memoryview | bytes) -> bool:
    n = len(piece)
    return bytes(piece) == (_ZEROS if n == CHUNK else bytes(n))   # memcmp, not per element


def _create_file(dir_fd: int, name: str) -> int | None:
    """A new file's fd (O_EXCL, never through a symlink); None when the name exists."""
    try:
        return os.open(name, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        return None


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
