"""The on-disk format of a containers-storage (podman 4.x) overlay image store, as pure functions.

What podman reads from a read-only additional image store (docs/DESIGN.md#podman-store), checked against
containers/storage (``images.go`` ``Image``, ``layers.go`` ``Layer``, ``store.go``
``makeBigDataBaseName``, ``drivers/overlay`` ``getLower``) and against what podman 4.3.1
itself writes when it pulls an image::

    overlay-images/images.json      [{id, digest, names, layer, big-data-names,
                                      big-data-sizes, big-data-digests, created}]
    overlay-images/<id>/<file>      one file per big-data key (see big_data_file_name)
    overlay-layers/layers.json      [{id, parent, created, compressed-diff-digest,
                                      compressed-size, diff-digest, diff-size}]
    overlay/<layer id>/diff         the layer's files (for us: a symlink into .layers)
    overlay/<layer id>/link         its short name, 26 upper-case base32 characters
    overlay/<layer id>/lower        "l/<short parent>:l/<short grandparent>:..." (not for a base)
    overlay/l/<short>               -> ../<layer id>/diff

Layer ids are the ones containers/image gives layers it pulls (``storage_dest.go``):
the bottom layer's id is its diffID hex, each further layer's is
``sha256(parent id + "+" + diffID hex)`` -- so a layer shared by two images is one entry.

An image with a layer dir that is not right as an overlay lower on this stack (raw
whiteouts, which a real CernVM-FS drops at publish; or completed on another parent
chain -- the snapshotter's rule, docs/DESIGN.md#whiteouts) is instead ONE podman layer whose ``diff``
is the image's top chain dir (the whole root fs, deletions applied): its id is
``chain_layer_id(top chainID)``, shared by images with the same chain, never equal to a
per-layer id. podman refuses a layer without ``diff-digest`` ("size for layer ... is
unknown, failing getSize()", podman 4.3), so it gets ``sha256:<its id>``: a digest no blob
can have, so podman never takes a pulled layer for it (a real diffID there would let a
pull reuse the whole root as one layer's diff). Its ``diff-size`` is the sum of the
image's layers' sizes (what a per-layer entry adds up to). No ``compressed-diff-digest``:
it is no registry blob: ``podman save``/``push`` refuse such an image ("expected more than
1 physical layers", podman 4.3), as they refuse per-layer images of this store (their
``diff`` is a relative link, "linkpath must be absolute").
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterable, Sequence

from cvmfs_common.oci.digest import parse_digest, sha256_of

IMAGES_DIR = "overlay-images"
LAYERS_DIR = "overlay-layers"
DRIVER_DIR = "overlay"
LINK_DIR = "l"
IMAGES_JSON = "images.json"
LAYERS_JSON = "layers.json"
IMAGES_LOCK = "images.lock"
LAYERS_LOCK = "layers.lock"

MANIFEST_KEY = "manifest"               # storage.ImageDigestBigDataKey: the image's main manifest
MANIFEST_KEY_PREFIX = "manifest-"       # "manifest-<digest>": every manifest the image was seen with
SHORT_ID_LEN = 26                       # containers/storage overlay idLength

# Go's time.Time unmarshals only RFC 3339; anything else in a config would break the
# whole images.json for podman, so it is dropped rather than copied.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def layer_ids(diff_ids: Iterable[str]) -> list[str]:
    """containers/image's storage layer ids for a stack of diffIDs (bottom first)."""
    out: list[str] = []
    for raw in diff_ids:
        diff_hex = parse_digest(raw).hex
        out.append(diff_hex if not out else
                   hashlib.sha256(f"{out[-1]}+{diff_hex}".encode()).hexdigest())
    return out


def chain_layer_id(chain_id: str) -> str:
    """The id of the one podman layer of an image served from its top chain dir. Another
    preimage form than containers/image's ids, so it never collides with a per-layer id."""
    return hashlib.sha256(f"chain:{parse_digest(chain_id)}".encode()).hexdigest()


def serves_per_layer(whiteouts: str | None, parent_chain: str | None, chain_below: str | None) -> bool:
    """Whether a layer dir is right as an overlay lower on ``chain_below`` (the chainID of
    the layers under it, None for a base layer): the snapshotter's rule (docs/DESIGN.md#whiteouts)."""
    return whiteouts in ("none", "overlay") and (parent_chain is None or parent_chain == chain_below)


def per_layer_stack(whiteouts: Sequence[str | None], parent_chains: Sequence[str | None],
                    chain_ids: Sequence[str]) -> bool:
    """Whether every layer dir of a stack (bottom first) serves per layer; else the image's
    podman entry is its top chain."""
    return all(serves_per_layer(w, p, chain_ids[i - 1] if i else None)
               for i, (w, p) in enumerate(zip(whiteouts, parent_chains, strict=True)))


def top_layer_id(diff_ids: Sequence[str], chain_ids: Sequence[str], per_layer: bool) -> str:
    """The podman layer an image's ``layer`` names: per-layer or its top chain's."""
    return layer_ids(diff_ids)[-1] if per_layer else chain_layer_id(chain_ids[-1])


def big_data_file_name(key: str) -> str:
    """containers/storage ``makeBigDataBaseName``: keys made only of ``[a-z0-9.]`` are used
    as they are, any other key becomes ``"=" + base64(key)`` (standard alphabet, padded)."""
    if key and all(c == "." or "0" <= c <= "9" or "a" <= c <= "z" for c in key):
        return key
    return "=" + base64.standard_b64encode(key.encode()).decode()


def manifest_key(manifest_digest: str) -> str:
    return MANIFEST_KEY_PREFIX + str(parse_digest(manifest_digest))


def short_link_id(layer_id: str) -> str:
    """The layer's name under ``overlay/l/``. containers/storage draws it at random; ours is
    derived from the layer id so that re-publishing the same layer writes the same bytes."""
    raw = hashlib.sha256(b"cvmfs podmanStore link " + layer_id.encode()).digest()
    return base64.b32encode(raw).decode()[:SHORT_ID_LEN]


def lower_file_content(parent_short_ids: Sequence[str]) -> str:
    """``lower`` of a layer: its ancestors' short links, nearest parent first."""
    return ":".join(f"{LINK_DIR}/{s}" for s in parent_short_ids)


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def config_created(config_bytes: bytes) -> str | None:
    """The image config's ``created``, if it is a time Go can read."""
    try:
        created = json.loads(config_bytes).get("created")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if isinstance(created, str) and _RFC3339.fullmatch(created):
        return created
    return None


def config_diff_ids(config_bytes: bytes) -> list[str]:
    """``rootfs.diff_ids`` of an image config (ValueError when absent or malformed)."""
    try:
        ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"image config has no rootfs.diff_ids: {e}") from None
    if not isinstance(ids, list):
        raise ValueError("image config rootfs.diff_ids is not a list")
    return [str(parse_digest(d)) for d in ids]


def layer_entry(layer_id: str, parent: str | None, created: str, compressed_digest: str,
                compressed_size: int, diff_id: str, diff_size: int) -> dict:
    """One ``layers.json`` object. diff-digest and diff-size are what podman uses for
    sizes and for matching pulled layers; without them it walks (or fails on) the layer."""
    entry: dict = {"id": layer_id}
    if parent:
        entry["parent"] = parent
    entry.update({
        "created": created,
        "compressed-diff-digest": compressed_digest,
        "compressed-size": compressed_size,
        "diff-digest": diff_id,
        "diff-size": diff_size,
    })
    return entry


def chain_layer_entry(layer_id: str, created: str, diff_size: int) -> dict:
    """The ``layers.json`` object of a chain layer: no parent, no blob, a diff digest no
    blob can have (see the module doc)."""
    return {"id": layer_id, "created": created, "diff-digest": f"sha256:{layer_id}", "diff-size": diff_size}


def image_entry(image_id: str, digest: str, names: list[str], top_layer: str,
                big_data: dict[str, bytes], created: str | None) -> dict:
    """One ``images.json`` object; ``big_data`` maps keys to the bytes stored for them."""
    keys = sorted(big_data)
    entry: dict = {
        "id": image_id,
        "digest": digest,
        "names": names,
        "layer": top_layer,
        "big-data-names": keys,
        "big-data-sizes": {k: len(big_data[k]) for k in keys},
        "big-data-digests": {k: sha256_of(big_data[k]) for k in keys},
    }
    if created is not None:
        entry["created"] = created
    return entry


def dump_json(obj: object) -> bytes:
    """Compact, like Go's json.Marshal (and stable, so unchanged state gives equal bytes)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
