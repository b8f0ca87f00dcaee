"""Publish one resolved image into the repository (docs/DESIGN.md#write).

Order, so that nothing of an image is visible before everything it needs is:
layers (in parallel) -> chains (bottom up) + ``.diffids`` links -> ``.flat`` (a copy of the top chain with
``.singularity.d``) -> the human-readable link and its ``.multiarch`` twin -> podman
store -> ``.metadata/.../config.json`` (+ ``index.json``) -> ``manifest.json`` (last: it marks the tag done).
With a ``podman_batch`` (convert) the podman store entry is only collected here and written
for all of a run's images at once, after their units (publisher/sync/convert.py).
Every step is content-addressed or an atomic swap, so a crash at any point leaves the
old state or a complete new one, and a re-run picks up what is already there.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.fsutil.entries import readlink
from cvmfs_common.oci.digest import chain_ids, parse_digest
from cvmfs_common.repo.diffids import ensure_diffid_link
from cvmfs_common.repo.paths import CONFIG_JSON, INDEX_JSON, LAYERFS, RepositoryLayout
from cvmfs_common.fsutil.atomic import relative_link_target, remove_tree
from cvmfs_common.fsutil.beneath import parent_beneath
from cvmfs_common.oci.reference import Reference
from cvmfs_common.oci.media import FOREIGN_LAYER_TYPES
from cvmfs_common.registry.manifest import ResolvedImage

from publisher.core.state import ImageRecord, LayerRecord
from publisher.write import podman_format as fmt
from publisher.write.grafts import GraftCache
from publisher.write.names import Placement, multiarch_name_for, podman_names, public_link_target
from publisher.write.podman_store import PodmanBatch, PodmanImage, PodmanLayer, PodmanRoot

# The unpacker, chains and flat copies are imported where an image is published (deliberately
# late): a no-change re-sync uses only Placement and the names, and starts ~30 ms faster.
if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.repo.metadata import LayerMetadata
    from publisher.unpack.ingest import Ingested, LayerIngester, LayerSpec

log = logging.getLogger(__name__)


class ImageError(RuntimeError):
    """The image cannot be published as it is (bad config, foreign layers, ...)."""


@dataclass(frozen=True)
class Staged:
    """An image whose new layers ``ImagePublisher.stage`` wrote; ``finish`` completes it."""

    ref: Reference
    image: ResolvedImage
    config: dict
    specs: "list[LayerSpec]"
    chains: list[str]
    done: "dict[int, Ingested]"  # index -> layer there (ingested now or before)
    first: "dict[str, LayerSpec]"  # each distinct blob's first position
    new_dirs: "tuple[Path, ...]" = ()  # the layer dirs stage put in place (not there before)
    trust_known: bool = True  # known_layer answers for its layers (False: a repair looks at the dirs)
    known: frozenset[str] = frozenset()  # the blobs known_layer answered for


@dataclass(frozen=True)
class Published:
    record: ImageRecord
    layers_fetched: int
    bytes_fetched: int
    # the layer, chain and flat dirs (and .diffids/<xx> of new links) this publish put in place
    # (finish; publish: stage's too): only these need a catalog marker (cvmfs backend)
    new_dirs: "tuple[Path, ...]" = ()


def layer_specs(image: ResolvedImage, config: dict) -> list[LayerSpec]:
    from publisher.unpack.ingest import LayerSpec

    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"config {image.config_digest} has no rootfs.diff_ids")
    if len(diff_ids) != len(image.layers):
        raise ImageError(f"config {image.config_digest} lists {len(diff_ids)} diffIDs for {len(image.layers)} layers")
    if not image.layers:
        raise ImageError(f"image {image.manifest_digest} has no layers")
    specs = []
    for i, (desc, diff) in enumerate(zip(image.layers, diff_ids)):
        if desc.media_type in FOREIGN_LAYER_TYPES or desc.urls:
            raise ImageError(f"layer {desc.digest} is a foreign (non-distributable) layer: not supported")
        specs.append(LayerSpec(i, desc.digest, desc.size, desc.media_type, str(parse_digest(diff))))
    return specs


class ImagePublisher:
    def __init__(self, layout: RepositoryLayout, ingester: LayerIngester, *, jobs: int = 4,
                 podman_store: Callable[[RepositoryLayout], object] | None = None,
                 podman_batch: "PodmanBatch | None" = None, published_raw_whiteouts: bool = True,
                 grafts: bool = False, durable: bool = True,
                 known_layer: "Callable[[str], LayerMetadata | None] | None" = None) -> None:
        self.layout = layout
        # a layer published in an earlier unit, as recorded (the caller's state): taken as there
        # without opening its dir -- on CernVM-FS a nested catalog the client would load
        self.known_layer = known_layer
        # False (cvmfs): a published layer dir has lost its `.wh.` files (Backend.published_raw_whiteouts)
        self.published_raw_whiteouts = published_raw_whiteouts
        # layers unpacked in the unit now open (the caller empties it when it opens one):
        # their dirs still hold their .wh. files
        self.fresh_layers: set[str] = set()
        self.grafts = grafts  # chains and flat dirs graft published files (cvmfs: publisher/write/grafts.py)
        self.graft_cache = GraftCache()  # valid for one unit, like fresh_layers
        # fresh layer -> the images that used it in this unit, in order (a dict as an ordered
        # set): written by end_unit, one origin.json write per layer instead of one per image
        self._origins: dict[str, dict[str, None]] = {}
        self.durable = durable  # chains and flat dirs synced before their rename (Backend.durable_renames)
        self.ingester = ingester
        self.jobs = max(1, jobs)
        self.podman_store = podman_store  # PodmanStore class (or None: --no-podman-store)
        self.podman_batch = podman_batch  # set: store entries are collected there, written later

    def new_unit(self) -> None:
        """A unit (a transaction) opens: what the last one saw of the repository is stale."""
        self.fresh_layers.clear()
        self.graft_cache.clear()
        self._origins.clear()  # an aborted unit's images are not listed in the next one's layers

    def end_unit(self) -> None:
        """The unit's writes are done (its publish is next): each fresh layer's origin.json
        gets the images that used it. Not called when the unit fails: it is aborted anyway."""
        pending, self._origins = self._origins, {}
        for digest, configs in pending.items():
            self.ingester.add_origins(digest, list(configs))

    # -- the whole image ---------------------------------------------------------------
    def publish(self, ref: Reference, image: ResolvedImage, config_bytes: bytes, config: dict,
                placement: Placement, platform: str, *, variant_link: bool = False,
                trust_known: bool = True) -> Published:
        """``variant_link``: the public link is a CernVM-FS variant link (names.public_link_target);
        the caller decides (the cvmfs backend, the default platform of a multi-platform tag)."""
        staged = self.stage(ref, image, config, trust_known=trust_known)
        published = self.finish(staged, config_bytes, placement, platform, variant_link=variant_link)
        return replace(published, new_dirs=staged.new_dirs + published.new_dirs)

    def missing_layers(self, image: ResolvedImage, config: dict, *, trust_known: bool = True) -> dict[str, int]:
        """The layers ``stage`` would write (not there, or not usable): blob digest -> size."""
        return {spec.digest: spec.size for spec in layer_specs(image, config)
                if self._present(spec, trust_known)[0] is None}

    def _present(self, spec: LayerSpec, trust_known: bool) -> tuple[LayerMetadata | None, str | None, bool]:
        """ingester.present, answered by ``known_layer`` where it may; also whether it was."""
        if trust_known and self.known_layer is not None:
            meta = self.known_layer(spec.digest)
            if meta is not None and meta.diff_digest == spec.diff_id:
                return meta, None, True
        return *self.ingester.present(spec), False

    def stage(self, ref: Reference, image: ResolvedImage, config: dict, *, trust_known: bool = True) -> "Staged":
        """The first part of ``publish``: the image's layers that are not there yet, fetched
        and unpacked (in parallel). ``finish`` does the rest (batched: in a later unit).
        ``trust_known`` False (a repair): every layer dir is looked at, none taken from
        ``known_layer``."""
        specs = layer_specs(image, config)
        chains = chain_ids([s.diff_id for s in specs])
        done, first, new, known = self._ingest(ref, image, specs, trust_known)
        return Staged(ref, image, config, specs, chains, done, first, tuple(self.layout.layer_dir(d) for d in new),
                      trust_known, frozenset(known))

    def finish(self, staged: "Staged", config_bytes: bytes, placement: Placement, platform: str, *,
               variant_link: bool = False) -> Published:
        """Chains (and the layers ``stage`` deferred), ``.flat``, names, podman, metadata."""
        from publisher.write.flat import build_flat

        ref, image, config, chains = staged.ref, staged.image, staged.config, staged.chains
        layers, fetched, nbytes, new_dirs = self._chains(staged)
        top_chain = self.layout.chain_dir(chains[-1])
        flat = build_flat(self.layout, self.layout.flat_dir(image.config_digest), top_chain, config,
                          grafts=self.grafts, graft_cache=self.graft_cache, durable=self.durable)
        if flat.built:
            new_dirs.append(flat.path)
        self._link(ref, image.config_digest, placement, platform, variant_link)
        self._multiarch_link(ref, image.config_digest, placement, platform)
        if self.podman_store is not None:
            self._podman(ref, image, config_bytes, layers, chains, placement)
        self._metadata(ref, image, config_bytes, placement)
        record = ImageRecord(
            manifest_digest=image.manifest_digest,
            config_digest=image.config_digest,
            media_type=image.media_type,
            platform=platform,
            layers=[
                LayerRecord(l.spec.digest, l.spec.diff_id, l.spec.size, l.meta.diff_size, l.meta.whiteouts,
                            l.meta.parent_chain, chains[i])
                for i, l in enumerate(layers)
            ],
        )
        return Published(record, fetched, nbytes, tuple(new_dirs))

    # -- layers and chains ---------------------------------------------------------------
    def _ingest(self, ref: Reference, image: ResolvedImage, specs: Sequence[LayerSpec],
                trust_known: bool) -> tuple[dict[int, Ingested], dict[str, LayerSpec], list[str], list[str]]:
        """(index -> layer there, each blob's first position, the digests ingested now, the
        digests known_layer answered for)"""
        from publisher.unpack.ingest import Ingested

        done: dict[int, Ingested] = {}
        todo: list[tuple[LayerSpec, bool]] = []  # (spec, replace an unusable dir)
        first: dict[str, LayerSpec] = {}  # an image may carry one blob twice (empty layers)
        new: list[str] = []
        known: list[str] = []
        for spec in specs:
            if spec.digest in first:
                continue
            first[spec.digest] = spec
            meta, why, from_known = self._present(spec, trust_known)
            if meta is not None:
                done[spec.index] = Ingested(spec, meta, self.layout.layerfs(spec.digest), 0)
                if from_known:
                    known.append(spec.digest)
                else:
                    self._add_origin(spec.digest, image.config_digest)
            else:
                if why:
                    log.warning("layer %s: %s; ingesting it again", spec.digest, why)
                todo.append((spec, why is not None))

        # Optimistic parallel pass: every layer on its own. A layer that omits parent
        # directories (rare: most tools write them) is redone below on its parent chain.
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.jobs, len(todo)), thread_name_prefix="ingest") as pool:
                futures: list[tuple[LayerSpec, Future]] = [
                    (spec, pool.submit(self.ingester.ingest, ref, spec, config_digest=image.config_digest,
                                       require_self_contained=spec.index > 0, replace_invalid=replace))
                    for spec, replace in todo
                ]
                try:
                    for spec, fut in futures:
                        got = fut.result()
                        if got is not None:
                            done[spec.index] = got
                            self.fresh_layers.add(spec.digest)
                            new.append(spec.digest)
                except BaseException:
                    for _, fut in futures:
                        fut.cancel()
                    raise
        return done, first, new, known

    def _add_origin(self, digest: str, config_digest: str) -> None:
        """origin.json lists the images that used a layer in the unit that created it, never
        more: appending later would rewrite a published layer's catalog (docs/DESIGN.md#origin)."""
        if digest in self.fresh_layers:
            self._origins.setdefault(digest, {})[config_digest] = None

    def _chains(self, staged: "Staged") -> tuple[list[Ingested], int, int, list[Path]]:
        """The layers ``_ingest`` deferred (unpacked on their parent chain), then the chains;
        also the layer and chain dirs put in place."""
        from publisher.unpack.ingest import Ingested

        ref, image, specs, chains, done = staged.ref, staged.image, staged.specs, staged.chains, staged.done
        fetched = sum(1 for l in done.values() if l.downloaded)
        nbytes = sum(l.downloaded for l in done.values())

        new_dirs: list[Path] = []
        parent: Path | None = None
        for spec in specs:
            parent_chain = chains[spec.index - 1] if spec.index else None
            layer = done.get(spec.index)
            if layer is None:
                meta, _, _ = self._present(spec, staged.trust_known)
                if meta is not None:  # published meanwhile, e.g. for an earlier position
                    layer = Ingested(spec, meta, self.layout.layerfs(spec.digest), 0)
                    self._add_origin(spec.digest, image.config_digest)
                else:  # deferred: needs the parent chain as its lower
                    layer = self.ingester.ingest(ref, spec, config_digest=image.config_digest,
                                                 lowers=[parent] if parent else [], parent_chain=parent_chain,
                                                 replace_invalid=os.path.lexists(self.layout.layer_dir(spec.digest)))
                    assert layer is not None
                    self.fresh_layers.add(spec.digest)
                    new_dirs.append(self.layout.layer_dir(spec.digest))
                    fetched += 1
                    nbytes += layer.downloaded
                done[spec.index] = layer
            parent, extra, built = self._chain(ref, spec, layer, chains[spec.index], parent, parent_chain,
                                               spec.digest in self.fresh_layers)
            nbytes += extra
            if built:
                new_dirs.append(parent)
        for spec in staged.first.values():  # containerd finds the layer by diffID (every compression)
            if spec.digest in staged.known:
                continue  # its link was made in the unit that published it (or by the format upgrade)
            if ensure_diffid_link(self.layout, spec.diff_id, spec.digest):
                new_dirs.append(self.layout.diffid_link(spec.diff_id).parent)
        return [done[s.index] for s in specs], fetched, nbytes, new_dirs

    def _chain(self, ref: Reference, spec: LayerSpec, layer: Ingested, chain_id: str, parent: Path | None,
               parent_chain: str | None, fresh: bool = True) -> tuple[Path, int, bool]:
        """(the chain dir, compressed bytes fetched for it, whether it was put in place now)"""
        from publisher.write.chains import ChainMerger, build_chain

        dest = self.layout.chain_dir(chain_id)
        if dest.is_dir():
            return dest, 0, False
        # A raw-whiteout layer published in an earlier unit has no deletions left on CernVM-FS
        # (its .wh. files are dropped at publish): a chain built from it would show deleted files.
        # (Unpacked in this run is not enough: a batched round publishes its layers first.)
        lost = not self.published_raw_whiteouts and not fresh and layer.meta.whiteouts == "raw"
        if not lost and (layer.meta.parent_chain is None or layer.meta.parent_chain == parent_chain):
            path, stats = build_chain(self.layout, chain_id, parent, self.layout.layer_dir(spec.digest) / LAYERFS,
                                      ChainMerger(grafts=self.grafts, graft_cache=self.graft_cache),
                                      durable=self.durable)
            return path, 0, stats is not None
        # The published dir lost its deletions, or was completed on another parent chain (its
        # implicit directories would carry that chain's attributes). Unpack a private copy here.
        if lost:
            log.info("layer %s: its published dir holds no deletions; unpacking it again for chain %s",
                     spec.digest, chain_id)
        else:
            log.info("layer %s was completed on chain %s; unpacking it on %s for chain %s",
                     spec.digest, layer.meta.parent_chain, parent_chain, chain_id)
        private = self.ingester.unpack_private(ref, spec, [parent] if parent else [])
        try:
            path, stats = build_chain(self.layout, chain_id, parent, private.layerfs,
                                      ChainMerger(grafts=self.grafts, graft_cache=self.graft_cache),
                                      durable=self.durable)
        finally:
            remove_tree(private.work)
        return path, private.result.compressed_size, stats is not None

    # -- names ---------------------------------------------------------------------------
    def _link(self, ref: Reference, config_digest: str, placement: Placement, platform: str,
              variant: bool) -> None:
        registry, repository, tag = ref.link_components
        lay = placement.layout
        link = lay.link_path(registry, repository, tag)
        target = public_link_target(lay, registry, repository, tag, platform, config_digest,
                                    variant=variant and placement.is_default)
        if readlink(link) != target:
            lay.atomic_symlink(target, link)  # a moved tag switches here, atomically

    def _multiarch_link(self, ref: Reference, config_digest: str, placement: Placement, platform: str) -> None:
        """``.multiarch/<arch>[:<variant>]/<registry>/<repo>:<tag>`` for the default platform
        (a non-default platform's link is there already: its image_root) + alias links."""
        name = multiarch_name_for(platform)
        if name is None:
            return
        if placement.is_default:
            registry, repository, tag = ref.link_components
            link = self.layout.multiarch_link(name, registry, repository, tag)
            target = relative_link_target(link, self.layout.flat_dir(config_digest))
            if readlink(link) != target:
                self.layout.atomic_symlink(target, link)
        self.layout.ensure_multiarch_aliases(name)

    def _podman(self, ref: Reference, image: ResolvedImage, config_bytes: bytes, layers: Sequence[Ingested],
                chains: Sequence[str], placement: Placement) -> None:
        """The podman store entry: per layer when every layer dir is a sound overlay lower
        on this stack, else the top chain as the image's one layer (raw whiteouts: a real
        CernVM-FS drops the .wh. files at publish, docs/podman.md)."""
        per_layer = fmt.per_layer_stack([l.meta.whiteouts for l in layers], [l.meta.parent_chain for l in layers],
                                        chains)
        root = None if per_layer else PodmanRoot(chains[-1], self.layout.chain_dir(chains[-1]),
                                                 sum(l.meta.diff_size for l in layers))
        store = self.podman_store(placement.layout)  # type: ignore[misc]
        entry = PodmanImage(
            config_digest=image.config_digest,
            config_bytes=config_bytes,
            manifest_digest=image.manifest_digest,
            manifest_bytes=image.manifest_bytes,
            names=podman_names(ref),
            layers=[PodmanLayer(l.spec.diff_id, l.spec.digest, l.spec.size, l.meta.diff_size, l.layerfs)
                    for l in layers],
            root=root,
        )
        if self.podman_batch is not None:
            self.podman_batch.add(store, entry)  # validated now; written at the batch's flush
        else:
            store.add_image(entry)  # type: ignore[attr-defined]

    def _metadata(self, ref: Reference, image: ResolvedImage, config_bytes: bytes, placement: Placement) -> None:
        registry, repository, tag = ref.link_components
        lay = placement.layout
        manifest = lay.manifest_json(registry, repository, tag)
        index = manifest.parent / INDEX_JSON
        # index.json lets `cvmfs-snapshotter pull` match the tag's HEAD digest without
        # fetching the index; a tag that no longer points at an index loses it first.
        if image.index_bytes is None:
            try:
                with parent_beneath(lay.root, index) as (dir_fd, name):  # (no planted symlink followed)
                    os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        for path, data in ((manifest.parent / CONFIG_JSON, config_bytes), (index, image.index_bytes),
                           (manifest, image.manifest_bytes)):
            if data is not None and _read(path) != data:
                lay.atomic_write_file(path, data)


def _read(path: Path) -> bytes | None:
    """What a regular file holds (None for anything else: a FIFO is not waited on, a
    symlink not followed; the caller then writes the file anew)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


__all__ = ["ImageError", "ImagePublisher", "Published", "Staged", "layer_specs"]
