"""What the registry serves, parsed: descriptors, manifests, one platform's resolved image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cvmfs_common.oci.digest import InvalidDigest, parse_digest
from cvmfs_common.oci.media import INDEXES
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import ManifestError


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_json(cls, obj: Any, ref: Reference) -> "Descriptor":
        if not isinstance(obj, dict):
            raise ManifestError(ref, "descriptor is not an object")
        try:
            digest = str(parse_digest(obj.get("digest")))  # type: ignore[arg-type]
        except InvalidDigest as e:
            raise ManifestError(ref, f"bad descriptor digest: {e}") from None
        size = obj.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(ref, f"bad descriptor size for {digest}: {size!r}")
        plat = None
        p = obj.get("platform")
        if isinstance(p, dict) and p.get("os") and p.get("architecture"):
            plat = Platform(str(p["os"]), str(p["architecture"]), p.get("variant") or None)
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=digest,
            size=size,
            platform=plat,
            urls=tuple(obj.get("urls") or ()),
            annotations=dict(obj.get("annotations") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    """Raw manifest bytes as served, their digest and media type, parsed JSON."""

    digest: str
    media_type: str
    raw: bytes
    parsed: dict

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEXES


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image: what the publisher and ``pull`` need."""

    reference: Reference
    manifest_digest: str
    manifest_bytes: bytes
    manifest: dict
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    platform: Platform | None = None
    index_digest: str | None = None  # set when the tag pointed at an index

    @property
    def config_digest(self) -> str:
        return self.config.digest

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]
