"""What a layer tar may contain: path normalisation, limits, header sanity, metadata decoding."""
from __future__ import annotations

import base64
import tarfile
import urllib.parse
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# Extended-header types whose payload tarfile reads into memory in one piece.
_HEADER_TYPES = frozenset((tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                           tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE))


@dataclass(frozen=True)
class Limits:
    """Refuse absurd layers before they fill the disk or the memory."""
    max_entries: int = 2_000_000
    max_total_bytes: int = 128 << 30        # uncompressed tar stream and sum of file sizes
    max_path_length: int = 4096             # bytes, symlink targets (the kernel's PATH_MAX)
    max_member_name: int = 64 << 10         # bytes, member names and hard link targets: deep
                                            # trees are fine (the writer is fd-relative)
    max_header_bytes: int = 1 << 20         # one PAX / GNU long-name header


class UnsafePath(ValueError):
    """A member name or link target that leaves the layer root."""


class HeaderTooLarge(ValueError):
    pass


def member_parts(name: str, max_length: int) -> tuple[str, ...]:
    """Split a member name into components below the root; () is the root itself.

    `.` and empty components vanish, `..` is resolved lexically (as Docker's
    filepath.Clean does) and must never climb above the root; absolute names are refused:
    honest layer writers never emit them."""
    if len(name.encode("utf-8", "surrogateescape")) > max_length:
        raise UnsafePath(f"path longer than {max_length} bytes")
    if "\0" in name:
        raise UnsafePath("NUL byte in path")
    if name.startswith("/"):
        raise UnsafePath("absolute path")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UnsafePath("path escapes the layer root")
            parts.pop()
        else:
            parts.append(comp)
    return tuple(parts)


def limited_tarinfo(max_header_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class refusing oversized extended headers before tarfile reads them into
    memory (tarfile documents _proc_member as the hook for subclasses)."""

    class LimitedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
            if self.type in _HEADER_TYPES and self.size > max_header_bytes:
                raise HeaderTooLarge(f"extended header of {self.size} bytes "
                                     f"(limit {max_header_bytes})")
            return super()._proc_member(tf)  # type: ignore[misc]

    return LimitedTarInfo


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes from PAX records: SCHILY.xattr.* (GNU tar, Go, Docker; values are
    raw bytes, which tarfile hands over as utf-8 + surrogateescape) and LIBARCHIVE.xattr.*
    (bsdtar: URL-encoded name, base64 value)."""
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                found.setdefault(name, base64.b64decode(value + "=" * (-len(value) % 4)))
            except ValueError:
                continue
    return found


def _pax_time_ns(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(Decimal(text) * 1_000_000_000)
    except (InvalidOperation, ValueError):
        return None


def member_times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; PAX decimal times keep their full precision (tarfile's float
    would lose it). atime defaults to mtime, as Docker does."""
    mtime = _pax_time_ns(member.pax_headers.get("mtime"))
    if mtime is None:
        mtime = int(member.mtime) * 1_000_000_000
    atime = _pax_time_ns(member.pax_headers.get("atime"))
    return (mtime if atime is None else atime), mtime
