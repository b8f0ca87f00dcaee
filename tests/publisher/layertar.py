"""Layer blobs built member by member with tarfile, for the unpacker's tests."""
from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from dataclasses import dataclass

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Blob:
    data: bytes          # compressed (or not) blob
    tar: bytes           # uncompressed tar stream
    digest: str
    diff_id: str

    def stream(self) -> io.BytesIO:
        return io.BytesIO(self.data)


def _info(name: str, type_: bytes, mode: int, uid: int, gid: int, mtime: float,
          xattrs: dict[str, bytes] | None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                          for k, v in xattrs.items()}
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
        mtime: float = MTIME, xattrs: dict[str, bytes] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs)
    ti.size = len(data)
    return ti, data


def dir_(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = MTIME,
         xattrs: dict[str, bytes] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs), b""


def sym(name: str, target: str, uid: int = 0, gid: int = 0,
        mtime: float = MTIME) -> tuple[tarfile.TarInfo, bytes]:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime, None)
    ti.linkname = target
    return ti, b""


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    ti = _info(name, tarfile.LNKTYPE, 0o644, 0, 0, MTIME, None)
    ti.linkname = target
    return ti, b""


def node(name: str, type_: bytes, major: int = 1, minor: int = 3) -> tuple[tarfile.TarInfo, bytes]:
    ti = _info(name, type_, 0o666, 0, 0, MTIME, None)
    ti.devmajor, ti.devminor = major, minor
    return ti, b""


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], *, raw_tail: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue() + raw_tail


def compress(tar: bytes, compression: str = "gzip") -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=1, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(tar)
    assert compression == "none"
    return tar


def blob_of_tar(tar: bytes, compression: str = "gzip") -> Blob:
    data = compress(tar, compression)
    return Blob(data, tar, "sha256:" + hashlib.sha256(data).hexdigest(),
                "sha256:" + hashlib.sha256(tar).hexdigest())


def blob(members: list[tuple[tarfile.TarInfo, bytes]], compression: str = "gzip") -> Blob:
    return blob_of_tar(tar_bytes(members), compression)


def header_only(ti: tarfile.TarInfo) -> bytes:
    """A member header without its data (to declare absurd sizes cheaply)."""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# --- binary xattr values -----------------------------------------------------------------

def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """system.posix_acl_* value: version 2, then (tag, perm, id) little-endian."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
NO_ID = 0xFFFFFFFF

# user::rwx user:1000:r-x group::r-x mask::r-x other::r-x  (mode 0755)
ACL_ACCESS = posix_acl([(ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 5, 1000), (ACL_GROUP_OBJ, 5, NO_ID),
                        (ACL_MASK, 5, NO_ID), (ACL_OTHER, 5, NO_ID)])
ACL_DEFAULT = posix_acl([(ACL_USER_OBJ, 7, NO_ID), (ACL_GROUP_OBJ, 5, NO_ID),
                         (ACL_GROUP, 7, 2000), (ACL_MASK, 7, NO_ID), (ACL_OTHER, 0, NO_ID)])
# VFS_CAP_REVISION_2 | effective, permitted = cap_net_bind_service (bit 10)
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
