"""Whiteout names in layer tars and their two on-disk forms (docs/DESIGN.md#whiteouts).

overlay: `.wh.NAME` becomes a char device 0:0 NAME, `.wh..wh..opq` in D becomes the xattr
         trusted.overlay.opaque=y on D (what kernel overlayfs understands);
raw:     the `.wh.*` files are kept as they are (what `cvmfs_server ingest` produces and
         fuse-overlayfs understands).
"""
from __future__ import annotations

import os
import stat
from enum import Enum

PREFIX = ".wh."
META_PREFIX = ".wh..wh."          # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
# overlayfs mounted with `userxattr` (rootless podman, fuse-overlayfs) reads these instead:
# from a tar they would forge whiteouts and redirects just the same.
USER_OVERLAY_XATTR_PREFIX = "user.overlay."
OVERLAY_XATTR_PREFIXES = (OVERLAY_XATTR_PREFIX, USER_OVERLAY_XATTR_PREFIX)


class WhiteoutMode(str, Enum):
    OVERLAY = "overlay"
    RAW = "raw"


class NameKind(Enum):
    PLAIN = "plain"
    WHITEOUT = "whiteout"     # .wh.NAME
    OPAQUE = "opaque"         # .wh..wh..opq
    META = "meta"             # other .wh..wh.* (aufs internals)


def classify(name: str) -> NameKind:
    """Kind of a single path component."""
    if not name.startswith(PREFIX):
        return NameKind.PLAIN
    if name == OPAQUE:
        return NameKind.OPAQUE
    if name.startswith(META_PREFIX):
        return NameKind.META
    return NameKind.WHITEOUT


def whited_out_name(name: str) -> str:
    """`.wh.NAME` -> NAME."""
    return name[len(PREFIX):]


def is_whiteout_device(st: os.stat_result) -> bool:
    """The overlay form of a deletion: a character device with device number 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
