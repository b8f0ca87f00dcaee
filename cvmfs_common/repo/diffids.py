"""``.diffids/<xx>/<hex>``: a layer dir found by its diffID (the publisher writes, gc drops).

containerd's unpacker names every layer it prepares by chainID and, since 2.3, by diffID;
neither is the compressed digest ``.layers`` is keyed by. One relative symlink per diffID
lets the snapshotter find the layer in one readlink, and finds it also when the image
carries it in another compression (a zstd re-push, a registry that recompresses). The link
names one of the layer dirs with that diffID; the reader checks that dir's layers.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cvmfs_common.fsutil.beneath import parent_beneath
from cvmfs_common.fsutil.entries import readlink, scandir
from cvmfs_common.oci.digest import Digest, InvalidDigest, parse_digest, parse_hex
from cvmfs_common.repo.lookup import find_layer, find_layer_by_diff_id
from cvmfs_common.repo.paths import RepositoryLayout


def ensure_diffid_link(layout: RepositoryLayout, diff_id: "str | Digest", layer_digest: "str | Digest") -> bool:
    """Point ``.diffids/<diff_id>`` at this layer's dir unless it already names a sound layer
    dir with that diffID; True when the link was (re)written. The layer must be published."""
    if find_layer_by_diff_id(layout, diff_id) is not None:
        return False
    found = find_layer(layout, layer_digest)
    if found is None or found.metadata is None or found.metadata.diff_digest != str(parse_digest(diff_id)):
        raise ValueError(f"layer {layer_digest} is not a published layer with diffID {diff_id}")
    # (its parent dirs are made below the root, no symlink followed)
    layout.atomic_symlink(layout.diffid_link_target(layer_digest), layout.diffid_link(diff_id))
    return True


def retarget_or_drop(layout: RepositoryLayout, diff_id: "str | Digest", gone: Iterable["str | Digest"],
                     others: Iterable["str | Digest"]) -> str | None:
    """After the layer dirs ``gone`` were removed: a link naming one of them is pointed at
    the first of ``others`` (layer dirs with the same diffID that stay) that is sound, or
    removed. Returns "retargeted", "removed" or None (left as it was)."""
    link = layout.diffid_link(diff_id)
    target = readlink(link)
    if target is None:
        return None
    named = layout.layer_digest_of_link_target(target)
    if named is not None and str(named) not in {str(parse_digest(g)) for g in gone}:
        return None
    for other in others:
        found = find_layer(layout, other)
        if found is not None and found.metadata is not None and found.metadata.diff_digest == str(parse_digest(diff_id)):
            layout.atomic_symlink(layout.diffid_link_target(other), link)
            return "retargeted"
    try:
        with parent_beneath(layout.root, link) as (parent_fd, name):
            os.unlink(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    return "removed"


def missing_diffid_links(layout: RepositoryLayout) -> list[tuple[str, str]]:
    """(diffID, layer digest) of every sound layer dir in ``.layers`` whose diffID has no
    working link (read-only): what :func:`ensure_diffid_link` would write."""
    missing: dict[str, str] = {}
    for prefix in sorted(e.name for e in scandir(layout.layers_dir) if e.is_dir(follow_symlinks=False)):
        for entry in sorted(scandir(layout.layers_dir / prefix), key=lambda e: e.name):
            try:
                digest = parse_hex(entry.name)
            except InvalidDigest:
                continue
            if digest.prefix != prefix:
                continue
            found = find_layer(layout, digest)
            if found is None or found.metadata is None:
                continue
            diff = found.metadata.diff_digest
            if diff not in missing and find_layer_by_diff_id(layout, diff) is None:
                missing[diff] = str(digest)
    return sorted(missing.items())
