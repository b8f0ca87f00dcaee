"""An image only a real CernVM-FS can judge: file capabilities, ACLs and cross-directory
hard links in its layer tar (PAX `SCHILY.xattr.*` records, as Docker and Go write them)."""
from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

from tests.fixtures.images import BUSYBOX, BuiltImage
from tests.fixtures.layers import MTIME, Layer

# security.capability, VFS_CAP_REVISION_2 with the effective flag: cap_net_raw+ep (getcap's spelling)
CAP_NET_RAW = 13
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << CAP_NET_RAW, 0, 0, 0)
# system.posix_acl_access v2: user::rw- user:1000:r-- group::r-- mask::r-- other::---
ACL_ACCESS = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
    (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
    (0x20, 0, 0xFFFFFFFF)))
GETFACL_USER = "user:1000:r--"

XATTR_IMAGE = ("test/cvmfs-attrs", "v1")


def _raw(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # tarfile writes it back byte for byte


def attrs_layer() -> Layer:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, mode: int = 0o755, data: bytes = b"", link: str = "",
                xattrs: dict[str, bytes] | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, MTIME, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": _raw(v) for k, v in xattrs.items()}
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        busybox = Path(BUSYBOX).read_bytes()
        for d in ("bin", "caps", "acl", "x", "x/a", "x/b"):
            add(d, tarfile.DIRTYPE)
        add("bin/busybox", tarfile.REGTYPE, data=busybox)
        add("bin/sh", tarfile.SYMTYPE, 0o777, link="busybox")
        add("caps/ping", tarfile.REGTYPE, data=b"#!/bin/sh\n", xattrs={"security.capability": CAPABILITY})
        add("acl/file", tarfile.REGTYPE, 0o640, data=b"acl\n", xattrs={"system.posix_acl_access": ACL_ACCESS})
        add("x/a/orig", tarfile.REGTYPE, 0o644, data=b"linked across directories\n")
        add("x/a/same-dir", tarfile.LNKTYPE, link="x/a/orig")
        add("x/b/other-dir", tarfile.LNKTYPE, link="x/a/orig")
    return Layer(buf.getvalue())


def push_attrs_image(host: str, work: Path) -> BuiltImage:
    from tests.publisher.clirun import push_image

    name, tag = XATTR_IMAGE
    return push_image(host, work, name, tag, [attrs_layer()])
