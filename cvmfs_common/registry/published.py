"""An image a repository already holds, used in place of registry requests only where its
bytes hash to what the registry says the tag is now.

The publisher keeps, per tag, ``.metadata/<registry>/<repo>:<tag>/``: ``manifest.json`` (the
platform's image manifest), ``config.json`` and, when the tag points at an index,
``index.json``. A HEAD of the tag (which Docker Hub does not count as a pull) gives the
digest the tag has now: when ``manifest.json`` or ``index.json`` hashes to it, and the index
picks exactly that manifest for the platform, and the config hashes to the manifest's
config digest, these bytes are what the registry would send. Anything else (the tag moved,
the files are missing, torn or hand-edited) is not an error: the caller asks the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_common.oci.digest import sha256_of
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import RegistryError
from cvmfs_common.registry.manifest import ResolvedImage, image_of, parse_config, parse_manifest, select_platform


@dataclass(frozen=True)
class PublishedFiles:
    """The files of one tag's metadata dir (None: missing or too big); `where` names it."""

    manifest: bytes | None
    config: bytes | None
    index: bytes | None = None
    where: str = ""


def match_published(ref: Reference, top_digest: str, want: Platform,
                    files: PublishedFiles) -> tuple[ResolvedImage, bytes, dict] | None:
    """(image, config bytes, config) when `files` are the tag's image for `want` as of
    `top_digest`; None otherwise."""
    if files.manifest is None or files.config is None:
        return None
    try:
        manifest = parse_manifest(ref, files.manifest)
        if manifest.digest == top_digest:
            image = image_of(ref, manifest)
        elif files.index is not None and sha256_of(files.index) == top_digest:
            index = parse_manifest(ref, files.index)
            if not index.is_index:
                return None
            chosen = select_platform(ref, index, want)
            if chosen.digest != manifest.digest:
                return None  # another platform's manifest next to this index
            image = image_of(ref, manifest, chosen.platform, index=index)
        else:
            return None
        if sha256_of(files.config) != image.config.digest or len(files.config) != image.config.size:
            return None
        return image, files.config, parse_config(ref, image.config.digest, files.config)
    except RegistryError:  # malformed, or the platform is not in the index: the registry decides
        return None


__all__ = ["PublishedFiles", "match_published"]
