"""Errors raised while unpacking a layer blob; each names the layer and, when known, the member."""
from __future__ import annotations


class LayerError(Exception):
    """A layer could not be unpacked (corrupt, unsupported, or an I/O failure)."""

    def __init__(self, layer: str, message: str, member: str | None = None) -> None:
        self.layer = layer
        self.member = member
        self.reason = message
        where = f" member {short_member(member)!r}" if member is not None else ""
        super().__init__(f"layer {layer}{where}: {message}")


class HostileLayerError(LayerError):
    """The layer tries something no honest layer does: escape the root, write through a
    symlink, hard-link outside, exceed a size or count limit."""


class DigestMismatchError(LayerError):
    """The blob's compressed digest or its diffID is not the expected one."""


def short_member(name: str, keep: int = 200) -> str:
    """A member name fit for a message: deep trees have names of many kilobytes."""
    if len(name) <= keep:
        return name
    return f"{name[:keep // 2]}...({len(name) - keep} characters)...{name[-keep // 2:]}"
