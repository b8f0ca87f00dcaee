"""What the registry serves, parsed: descriptors, manifests, one platform's resolved image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import json

from cvmfs_common.oci.digest import InvalidDigest, parse_digest, sha256_of
from cvmfs_common.oci.media import (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, IMAGE_MANIFESTS, INDEXES, OCI_INDEX,
                                     OCI_MANIFEST)
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import ManifestError, PlatformNotInIndex


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
    index_bytes: bytes | None = None  # that index as served (the publisher keeps it: index.json)

    @property
    def config_digest(self) -> str:
        return self.config.digest

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]


def parse_manifest(ref: Reference, raw: bytes, content_type: str = "", name: str | None = None) -> Manifest:
    """Bytes of a manifest or index -> Manifest (digest = their sha256), or ManifestError:
    not JSON, Docker schema 1, or a media type we do not handle. ``name``: what messages
    call it (default: its digest)."""
    digest = sha256_of(raw)
    name = name or digest
    parsed = _json_object(ref, raw, f"manifest {name}")
    media_type = parsed.get("mediaType") or content_type.split(";")[0].strip()
    if not media_type:  # OCI allows omitting it; infer from the shape
        media_type = OCI_INDEX if "manifests" in parsed else OCI_MANIFEST
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED) or parsed.get("schemaVersion") == 1:
        raise ManifestError(ref, f"manifest {name}: Docker schema 1 is not supported")
    if not isinstance(media_type, str) or (media_type not in IMAGE_MANIFESTS and media_type not in INDEXES):
        raise ManifestError(ref, f"manifest {name}: unsupported media type {media_type!r}")
    return Manifest(digest=digest, media_type=media_type, raw=raw, parsed=parsed)


def select_platform(ref: Reference, index: Manifest, want: Platform) -> Descriptor:
    """The index entry for ``want`` (attestations skipped; without a variant asked for, the
    architecture's default variant or none first), or PlatformNotInIndex."""
    entries = index.parsed.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(ref, f"index {index.digest} has no manifests list")
    candidates: list[Descriptor] = []
    for e in entries:
        d = Descriptor.from_json(e, ref)
        # BuildKit attestations sit in indexes as platform unknown/unknown.
        if d.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
            continue
        if d.media_type and d.media_type not in IMAGE_MANIFESTS:
            continue
        if d.platform is not None and want.matches(d.platform):
            candidates.append(d)
    if not candidates:
        offered = sorted({str(Descriptor.from_json(e, ref).platform) for e in entries})
        raise PlatformNotInIndex(ref, f"no manifest for platform {want} in index {index.digest} (has: {', '.join(offered)})")
    if want.variant is None:
        # Prefer the architecture's default variant (or none) over e.g. arm/v6.
        default = want.normalized_variant  # (no variant asked for: the architecture's default)
        candidates.sort(key=lambda d: 0 if d.platform and d.platform.variant in (None, default) else 1)
    return candidates[0]


def image_of(ref: Reference, manifest: Manifest, platform: Platform | None = None,
             index: Manifest | None = None) -> ResolvedImage:
    """An image manifest (chosen from ``index`` for ``platform``, if any) as a ResolvedImage."""
    if manifest.is_index:
        where = f"index {index.digest} points at another index {manifest.digest}" if index else \
            f"{manifest.digest} is an index, not an image manifest"
        raise ManifestError(ref, where)
    body = manifest.parsed
    config = Descriptor.from_json(body.get("config"), ref)
    layers_json = body.get("layers")
    if not isinstance(layers_json, list):
        raise ManifestError(ref, f"manifest {manifest.digest} has no layers list")
    layers = tuple(Descriptor.from_json(layer, ref) for layer in layers_json)
    return ResolvedImage(
        reference=ref,
        manifest_digest=manifest.digest,
        manifest_bytes=manifest.raw,
        manifest=body,
        media_type=manifest.media_type,
        config=config,
        layers=layers,
        platform=platform,
        index_digest=index.digest if index else None,
        index_bytes=index.raw if index else None,
    )


def parse_config(ref: Reference, digest: str, data: bytes) -> dict:
    """An image config blob's JSON object, or ManifestError."""
    return _json_object(ref, data, f"config {digest}")


def _json_object(ref: Reference, raw: bytes, what: str) -> dict:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ManifestError(ref, f"{what} is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ManifestError(ref, f"{what} is not a JSON object")
    return parsed
