"""Layers and chains published by hand into a temporary repository (the layout module's
paths, made-up digests), for the layer-source tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.diffids import ensure_diffid_link
from cvmfs_common.repo.metadata import LayerMetadata, write_layers_json
from cvmfs_common.repo.paths import RepositoryLayout


def d(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


BLOBS = [d("blob0"), d("blob1"), d("blob2")]
DIFFS = [d("diff0"), d("diff1"), d("diff2")]
CHAINS = chain_ids(DIFFS)


def publish_layer(layout: RepositoryLayout, i: int, whiteouts="overlay", parent_chain=None, blob=None) -> Path:
    blob = blob or BLOBS[i]
    fs = layout.layerfs(blob)
    fs.mkdir(parents=True)
    (fs / f"file{i}").write_text(str(i))
    layout.layers_json(blob).parent.mkdir(parents=True)
    meta = LayerMetadata(DIFFS[i][7:], blob, DIFFS[i], 10, whiteouts, parent_chain=parent_chain)
    write_layers_json(layout.layers_json(blob), meta)
    ensure_diffid_link(layout, DIFFS[i], blob)
    return fs


def publish_chain(layout: RepositoryLayout, chain: str) -> Path:
    p = layout.chain_dir(chain)
    p.mkdir(parents=True)
    (p / "from-chain").write_text(chain)
    return p
