"""Write test repositories from images in the loopback registry, with the shared layout
module and the publisher's unpacker (as the publisher does), or the DUCC way."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cvmfs_common.oci.digest import ducc_chain_ids
from cvmfs_common.repo.diffids import ensure_diffid_link
from cvmfs_common.repo.metadata import LayerMetadata, write_layers_json
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.registry.client import RegistryClient
from publisher.unpack.unpack import unpack_layer


def publish_layers(host: str, image, layout: RepositoryLayout, indices, whiteouts: str = "overlay",
                   diffid_links: bool = True) -> None:
    """Unpack the image's layers `indices` into `.layers/` with layers.json (bottom first) and,
    as the publisher does, their `.diffids` links (no chains: `publish_chains`)."""
    client = RegistryClient(insecure_registries=[host])
    chains = image.chain_ids()
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        for i in sorted(indices):
            digest = image.layers[i]
            lowers = [layout.layerfs(image.layers[j]) for j in reversed(range(i))]
            work = Path(tempfile.mkdtemp(dir=layout.tmp_dir)) / "layerfs"
            reader = client.open_blob(f"{host}/{image.name}", digest)
            result = unpack_layer(reader, work, digest=digest, diff_id=image.diff_ids[i], whiteouts=whiteouts,
                                  lowers=[p for p in lowers if p.is_dir()])
            target = layout.layerfs(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work, target)
            shutil.rmtree(work.parent)
            layout.layers_json(digest).parent.mkdir(parents=True, exist_ok=True)
            parent_chain = chains[i - 1] if i and result.depends_on_parent_chain else None
            meta = LayerMetadata(image.diff_ids[i][7:], digest, image.diff_ids[i], result.diff_size,
                                 result.whiteouts, parent_chain=parent_chain)
            write_layers_json(layout.layers_json(digest), meta)
            if diffid_links:
                ensure_diffid_link(layout, image.diff_ids[i], digest)
    finally:
        client.close()


def publish_chains(image, layout: RepositoryLayout) -> list[Path]:
    """The image's `.chains/<chainID>` dirs from its published layer dirs, with the publisher's
    chain writer (every layer must be in `.layers`)."""
    from publisher.write.chains import build_chain

    parent = None
    made = []
    for digest, chain in zip(image.layers, image.chain_ids()):
        parent, _ = build_chain(layout, chain, parent, layout.layerfs(digest))
        made.append(parent)
    return made


def publish_ducc_style(host: str, image, layout: RepositoryLayout, chains: bool = True) -> list[Path]:
    """As DUCC writes unpacked.cern.ch: raw `.wh.` files in `.layers` (no `whiteouts` field,
    DUCC's layers.json has none), and `.chains/<DUCC id>` holding each converted chain
    (`chains=False`: none, as DUCC's flats merged from layer dirs leave it)."""
    publish_layers(host, image, layout, range(len(image.layers)), whiteouts="raw", diffid_links=False)
    for digest in image.layers:  # DUCC's metadata carries no whiteouts field: unknown
        path = layout.layers_json(digest)
        meta = LayerMetadata.from_bytes(path.read_bytes())
        meta.whiteouts = None
        meta.parent_chain = None  # DUCC records none
        write_layers_json(path, meta)
    if not chains:
        return []
    # Chains: the merged view of converted layers, copied (what CVMFS's sync produces).
    converted = RepositoryLayout(Path(tempfile.mkdtemp(dir=layout.tmp_dir)) / "converted")
    publish_layers(host, image, converted, range(len(image.layers)), whiteouts="overlay")
    chain_dirs = []
    for n, chain_id in enumerate(ducc_chain_ids(image.layers)):
        lowers = ":".join(str(converted.layerfs(d)) for d in reversed(image.layers[: n + 1]))
        mnt = Path(tempfile.mkdtemp(dir=layout.tmp_dir))
        if n == 0:
            src = converted.layerfs(image.layers[0])
        else:
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}", str(mnt)], check=True)
            src = mnt
        try:
            dest = layout.chain_dir(chain_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", f"{src}/.", str(dest)], check=True)
            if n == 0:  # a single layer may still hold converted whiteout devices: drop them
                subprocess.run(["find", str(dest), "-type", "c", "-delete"], check=True)
        finally:
            if n:
                subprocess.run(["umount", str(mnt)], check=True)
        chain_dirs.append(dest)
    shutil.rmtree(converted.root)
    return chain_dirs
