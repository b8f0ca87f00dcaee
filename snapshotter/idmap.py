"""User namespaces: the id mapping containerd asks for, and idmapped mounts of lower dirs.

With `capabilities = ["remap-ids"]` on the proxy plugin, containerd (CRI, `ctr run
--remap-labels`) sends the pod's mapping as the labels below on Prepare/View and leaves it
to the snapshotter to show the image's files with the pod's ids. containerd's own overlay
snapshotter passes `uidmap=`/`gidmap=` mount options and its mount code idmaps the lowers;
since 2.1.6 that code idmaps the lowers' common parent once, which our lower links
(symlinks into the repository) leave. So we make the idmapped mounts ourselves
(open_tree + mount_setattr(MOUNT_ATTR_IDMAP) + move_mount) and return a plain overlay on
them: any containerd, any shim. The syscall numbers are the same on every architecture.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping

UIDMAP_LABEL = "containerd.io/snapshot/uidmapping"
GIDMAP_LABEL = "containerd.io/snapshot/gidmapping"

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_IDMAP = 0x100000
_MS_PRIVATE = 1 << 18
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MNT_DETACH = 2
_USERNS_TIMEOUT = 5.0


class IdMapError(ValueError):
    """Labels that are not a mapping containerd could have written."""


class IdmapUnsupported(OSError):
    """The kernel or the file system refuses an idmapped mount of a directory."""


@dataclass(frozen=True)
class IdMap:
    """A pod's mapping as containerd writes it: "ctr:host:size[,ctr:host:size...]" per label."""

    uids: tuple[tuple[int, int, int], ...]
    gids: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> "IdMap | None":
        uid, gid = labels.get(UIDMAP_LABEL), labels.get(GIDMAP_LABEL)
        if uid is None and gid is None:
            return None
        if not uid or not gid:
            raise IdMapError(f"user namespace: both {UIDMAP_LABEL} and {GIDMAP_LABEL} are needed")
        m = cls(_parse(UIDMAP_LABEL, uid), _parse(GIDMAP_LABEL, gid))
        m.root()  # containerd requires a mapping of the container's 0
        return m

    @classmethod
    def decode(cls, text: str) -> "IdMap":
        uid, _, gid = text.partition("\n")
        return cls(_parse(UIDMAP_LABEL, uid), _parse(GIDMAP_LABEL, gid.strip()))

    def encode(self) -> str:
        return f"{_format(self.uids)}\n{_format(self.gids)}\n"

    def root(self) -> tuple[int, int]:
        """The host ids of the container's root (the owner of a new upper dir)."""
        uid = next((h for c, h, _ in self.uids if c == 0), None)
        gid = next((h for c, h, _ in self.gids if c == 0), None)
        if uid is None or gid is None:
            raise IdMapError("user namespace: the mapping has no entry for the container's uid/gid 0")
        return uid, gid

    def map_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """Where a file owned by (uid, gid) shows under this mapping (65534 when unmapped)."""
        return _map_one(self.uids, uid), _map_one(self.gids, gid)


def _map_one(ranges: tuple[tuple[int, int, int], ...], i: int) -> int:
    for c, h, n in ranges:
        if c <= i < c + n:
            return h + i - c
    return 65534


def _parse(label: str, value: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for part in value.split(","):
        fields = part.split(":")
        try:
            c, h, n = (int(f) for f in fields)
        except ValueError:
            raise IdMapError(f"user namespace: {label}={value!r} is not ctr:host:size[,...]") from None
        if min(c, h) < 0 or n <= 0 or max(c + n, h + n) > 2**32:
            raise IdMapError(f"user namespace: {label}={value!r} has a range out of bounds")
        out.append((c, h, n))
    return tuple(out)


def _format(ranges: tuple[tuple[int, int, int], ...]) -> str:
    return ",".join(f"{c}:{h}:{n}" for c, h, n in ranges)


# -- the kernel's new mount API ----------------------------------------------------------

class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str, path: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)
    return ret


def userns_fd(idmap: IdMap) -> int:
    """An fd of a new user namespace with `idmap` (for MOUNT_ATTR_IDMAP). A process may not
    unshare a user namespace while it has threads, so a child (util-linux `unshare`) makes
    it; we write its maps, as containerd's GetUsernsFD does, and keep only the fd."""
    child = subprocess.Popen(["unshare", "--user", "--", "cat"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + _USERNS_TIMEOUT
        while True:
            try:
                if os.readlink(f"/proc/{child.pid}/ns/user") != own:
                    break
            except FileNotFoundError:
                pass
            if child.poll() is not None:
                raise OSError(errno.EPERM, "could not create a user namespace: "
                              + child.stderr.read().decode(errors="replace").strip())
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "timed out creating a user namespace")
            time.sleep(0.0005)
        for name, ranges in (("uid_map", idmap.uids), ("gid_map", idmap.gids)):
            with open(f"/proc/{child.pid}/{name}", "w") as f:
                f.write("".join(f"{c} {h} {n}\n" for c, h, n in ranges))
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=_USERNS_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stderr.close()


def idmapped_bind(source: str, target: str, ns_fd: int) -> None:
    """Mount `source` (a directory, its submounts too) read-only at `target`, its owners
    shifted through the user namespace `ns_fd`. IdmapUnsupported when the file system
    cannot do it (a FUSE file system that does not allow idmapping, e.g. CernVM-FS)."""
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source),
                              _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE), "open_tree", source)
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY, 0, _MS_PRIVATE, ns_fd)
        ret = _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE,
                            ctypes.byref(attr), ctypes.sizeof(attr))
        if ret < 0:
            e = ctypes.get_errno()
            if e in (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                raise IdmapUnsupported(e, f"idmapped mount refused: {os.strerror(e)}", source)
            raise OSError(e, f"mount_setattr: {os.strerror(e)}", source)
        _check(_libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(target),
                             _MOVE_MOUNT_F_EMPTY_PATH), "move_mount", target)
    finally:
        os.close(fd)


def detach(target: str) -> None:
    """Lazy unmount: an overlay still using the lower keeps it alive until it goes."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) < 0:
        e = ctypes.get_errno()
        if e != errno.EINVAL:  # EINVAL: not a mount point (never mounted, or already gone)
            raise OSError(e, f"umount: {os.strerror(e)}", target)


def mounted_names(parent: str) -> set[str]:
    """The entries of `parent` something is mounted on: readdir shows the covered dir's
    inode, stat the mounted root's (cheaper than mountinfo, which grows with every pod)."""
    out = set()
    try:
        with os.scandir(parent) as it:
            for entry in it:
                try:
                    if os.stat(entry.path).st_ino != entry.inode():
                        out.add(entry.name)
                except OSError:
                    continue
    except FileNotFoundError:
        pass
    return out
