"""Publish fixture images into a test repository the way the publisher does: layer blobs
streamed from the registry into publisher/unpack.py, each into `layout.layerfs(digest)`,
then the image into the podman store. Used by the podman store tests and bench."""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.metadata import LayerMetadata, read_layers_json, write_layers_json
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import publish_dir, remove_tree
from publisher.write.chains import build_chain
from publisher.write.podman_store import PodmanImage, PodmanLayer, PodmanRoot
from publisher.unpack.unpack import unpack_layer

ACCEPT = ", ".join(("application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"))


def _get(url: str, accept: str | None = None):
    headers = {"Accept": accept} if accept else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)


def fetch_image(host: str, name: str, manifest_digest: str) -> tuple[bytes, bytes]:
    """(manifest bytes, config bytes) of one image manifest."""
    with _get(f"http://{host}/v2/{name}/manifests/{manifest_digest}", ACCEPT) as r:
        manifest = r.read()
    config_digest = json.loads(manifest)["config"]["digest"]
    with _get(f"http://{host}/v2/{name}/blobs/{config_digest}") as r:
        return manifest, r.read()


def publish_layers(layout: RepositoryLayout, host: str, name: str, manifest: bytes, config: bytes,
                   whiteouts: str) -> list[PodmanLayer]:
    """Unpack each layer the repository lacks; lowers = the layer dirs below, topmost first
    (for the attributes of directories a layer omits)."""
    m, c = json.loads(manifest), json.loads(config)
    diff_ids = c["rootfs"]["diff_ids"]
    chains = chain_ids(diff_ids)
    out: list[PodmanLayer] = []
    for i, (desc, diff_id) in enumerate(zip(m["layers"], diff_ids, strict=True)):
        layerfs = layout.layerfs(desc["digest"])
        if not layerfs.is_dir():
            work = layout.make_work_dir("layer-")
            try:
                with _get(f"http://{host}/v2/{name}/blobs/{desc['digest']}") as blob:
                    result = unpack_layer(blob, work / "layerfs", digest=desc["digest"],
                                          diff_id=diff_id, media_type=desc.get("mediaType"),
                                          whiteouts=whiteouts,
                                          lowers=[l.layerfs for l in reversed(out)])
                write_layers_json(work / ".metadata" / "layers.json", LayerMetadata(
                    id=diff_id.removeprefix("sha256:"), compressed_diff_digest=desc["digest"],
                    diff_digest=diff_id, diff_size=result.diff_size, whiteouts=result.whiteouts,
                    parent_chain=chains[i - 1] if i and result.depends_on_parent_chain else None))
                os.chmod(work, 0o755)
                publish_dir(work, layout.layer_dir(desc["digest"]))
            finally:
                remove_tree(work)
        meta = read_layers_json(layout.layers_json(desc["digest"]))
        out.append(PodmanLayer(diff_id=diff_id, compressed_digest=desc["digest"],
                               compressed_size=desc["size"], diff_size=meta.diff_size,
                               layerfs=layerfs))
    return out


def podman_image(layout: RepositoryLayout, host: str, name: str, manifest_digest: str,
                 names: list[str], whiteouts: str = "overlay", chain_root: bool = False) -> PodmanImage:
    """chain_root: build the chains and give the image its top chain as its one podman layer
    (what the publisher does for raw whiteouts), then drop the layer dirs' `.wh.` files as a
    real CernVM-FS publish does -- the store must not need them."""
    manifest, config = fetch_image(host, name, manifest_digest)
    layers = publish_layers(layout, host, name, manifest, config, whiteouts)
    root = None
    if chain_root:
        chains = chain_ids(json.loads(config)["rootfs"]["diff_ids"])
        parent = None
        for chain, layer in zip(chains, layers, strict=True):
            parent, _ = build_chain(layout, chain, parent, layer.layerfs)
        for layer in layers:
            drop_whiteout_files(layer.layerfs)
        root = PodmanRoot(chains[-1], layout.chain_dir(chains[-1]), sum(l.diff_size for l in layers))
    return PodmanImage(config_digest=json.loads(manifest)["config"]["digest"], config_bytes=config,
                       manifest_digest=manifest_digest, manifest_bytes=manifest, names=names,
                       layers=layers, root=root)


def drop_whiteout_files(layerfs: Path) -> list[str]:
    """Remove every `.wh.*` name below ``layerfs`` (CernVM-FS takes them for aufs whiteouts
    and never publishes them, docs/cvmfs-backend.md); the removed paths, relative."""
    gone = []
    for dirpath, dirnames, filenames in os.walk(layerfs):
        for n in dirnames + filenames:
            if n.startswith(".wh."):
                p = Path(dirpath) / n
                gone.append(str(p.relative_to(layerfs)))
                remove_tree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        dirnames[:] = [d for d in dirnames if not d.startswith(".wh.")]
    return gone

