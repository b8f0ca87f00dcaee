"""Read-only lookups in a repository: is a layer (or a chain) there and usable."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.oci.digest import Digest, parse_digest
from cvmfs_common.repo.metadata import LayerMetadata, MetadataError, read_layers_json
from cvmfs_common.repo.paths import RepositoryLayout


@dataclass(frozen=True)
class LayerPresence:
    """A layer found in the repository."""

    digest: str
    layerfs: Path
    metadata: LayerMetadata | None  # None: no/unreadable layers.json
    metadata_error: str | None = None


def find_layer(layout: RepositoryLayout, layer_digest: "str | Digest") -> LayerPresence | None:
    """Is the layer published, and what does its layers.json say? (read-only)

    Returns None when ``layerfs`` is not a directory. A missing or malformed
    layers.json gives ``metadata=None`` (with the reason) rather than an error:
    such a layer must not be served as a lower (docs/DESIGN.md#whiteouts) but may still exist.
    """
    d = parse_digest(layer_digest)
    fs = layout.layerfs(d)
    try:
        if not stat.S_ISDIR(os.stat(fs).st_mode):
            return None
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    meta: LayerMetadata | None = None
    why: str | None = None
    try:
        meta = read_layers_json(layout.layers_json(d))
        if meta.compressed_diff_digest != str(d):
            why = f"layers.json names {meta.compressed_diff_digest}, not {d}"
            meta = None
    except FileNotFoundError:
        why = "no layers.json"
    except (MetadataError, OSError) as e:
        why = str(e)
    return LayerPresence(digest=str(d), layerfs=fs, metadata=meta, metadata_error=why)


def find_layer_by_diff_id(layout: RepositoryLayout, diff_id: "str | Digest") -> LayerPresence | None:
    """A layer dir with this diffID, through ``.diffids/<xx>/<hex>`` (read-only): one
    readlink, then :func:`find_layer` of the dir it names. None when there is no link,
    the link names anything but a layer dir, or that layer's layers.json gives another
    diffID (a stale or forged link is never followed to the wrong content)."""
    d = parse_digest(diff_id)
    try:
        target = os.readlink(layout.diffid_link(d))
    except OSError:  # no link (or not a link)
        return None
    layer = layout.layer_digest_of_link_target(target)
    if layer is None:
        return None
    found = find_layer(layout, layer)
    if found is None or found.metadata is None or found.metadata.diff_digest != str(d):
        return None
    return found


def find_chain(layout: RepositoryLayout, chain_id: "str | Digest") -> Path | None:
    """The chain directory if it exists (read-only)."""
    p = layout.chain_dir(chain_id)
    try:
        return p if stat.S_ISDIR(os.stat(p).st_mode) else None
    except (FileNotFoundError, NotADirectoryError):
        return None
