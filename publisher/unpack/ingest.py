"""One layer: registry blob -> hardened unpacker -> ``.layers/<xx>/<hex>`` (docs/DESIGN.md#unpack).

The blob streams from the registry straight into the unpacker (never a whole
layer in memory or on disk twice); both digests are verified while streaming.
The layer dir is assembled under ``.tmp/`` -- ``layerfs/`` plus
``.metadata/layers.json`` and ``origin.json`` -- synced, and renamed into place
in one step, so a published layer dir is always complete.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.oci.digest import parse_digest
from cvmfs_common.repo.paths import LAYERFS, LAYERS_JSON, METADATA_DIR, ORIGIN_JSON, RepositoryLayout
from cvmfs_common.repo.metadata import LayerMetadata, origin_json_bytes, read_origin_json
from cvmfs_common.fsutil.atomic import exchange_dirs, publish_dir, remove_tree, syncfs
from cvmfs_common.repo.lookup import find_layer
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.client import RegistryClient

from publisher.unpack.unpack import Limits, UnpackResult, unpack_layer
from publisher.unpack.whiteouts import WhiteoutMode

log = logging.getLogger(__name__)


class LayerConflict(RuntimeError):
    """The repository already has this blob with a different diffID than the config says."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer of an image: the manifest's descriptor plus the config's diffID."""

    index: int
    digest: str
    size: int
    media_type: str
    diff_id: str


@dataclass(frozen=True)
class Ingested:
    spec: LayerSpec
    meta: LayerMetadata
    layerfs: Path
    downloaded: int  # compressed bytes fetched for it in this run (0: it was there)


@dataclass(frozen=True)
class PrivateUnpack:
    """A layer unpacked under ``.tmp/`` for one use only; the caller removes ``work``."""

    work: Path
    layerfs: Path
    result: UnpackResult


class _Counting:
    """Reports bytes as they stream past (progress display, end summary)."""

    def __init__(self, inner, on_bytes: Callable[[int], None] | None) -> None:
        self._inner = inner
        self._on_bytes = on_bytes
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        if data:
            self.count += len(data)
            if self._on_bytes is not None:
                self._on_bytes(len(data))
        return data


@dataclass
class LayerIngester:
    layout: RepositoryLayout
    client: RegistryClient
    whiteouts: WhiteoutMode = WhiteoutMode.OVERLAY  # local backend; the cvmfs backend keeps them raw
    limits: Limits = Limits()
    on_bytes: Callable[[int], None] | None = None
    durable: bool = True  # synced before the rename into place (Backend.durable_renames)

    def __post_init__(self) -> None:
        self._origin_lock = threading.Lock()

    # -- what is there ------------------------------------------------------------------
    def present(self, spec: LayerSpec) -> tuple[LayerMetadata | None, str | None]:
        """(metadata, None) when published and usable; (None, why) when it must be
        (re)ingested; raises LayerConflict when the dir contradicts the config."""
        found = find_layer(self.layout, spec.digest)
        if found is None:
            if os.path.lexists(self.layout.layer_dir(spec.digest)):  # e.g. a lost layerfs/
                return None, f"layer dir without {LAYERFS}/"
            return None, None
        if found.metadata is None:
            return None, f"unusable layer dir ({found.metadata_error})"
        if found.metadata.diff_digest != spec.diff_id:
            raise LayerConflict(
                f"layer {spec.digest}: repository has diffID {found.metadata.diff_digest}, "
                f"the image config says {spec.diff_id}"
            )
        return found.metadata, None

    # -- fetching -----------------------------------------------------------------------
    def _unpack(self, ref: Reference, spec: LayerSpec, dest: Path, lowers: Sequence[Path]) -> tuple[UnpackResult, int]:
        # The unpacker hashes the blob while unpacking and raises DigestMismatchError:
        # the client need not hash it a second time (it still checks the size).
        blob = self.client.open_blob(ref, spec.digest, spec.size, verify=False)
        counted = _Counting(blob, self.on_bytes)
        try:
            result = unpack_layer(
                counted, dest, digest=spec.digest, diff_id=spec.diff_id, media_type=spec.media_type or None,
                whiteouts=self.whiteouts, lowers=list(lowers), limits=self.limits,
                early_writeback=self.durable,
            )
            blob.finish()  # the registry client's own end-of-stream verification
        finally:
            blob.close()
        for skipped in result.skipped:
            log.warning("layer %s: skipped %s: %s", spec.digest, skipped.member, skipped.reason)
        return result, counted.count

    def ingest(self, ref: Reference, spec: LayerSpec, *, config_digest: str, lowers: Sequence[Path] = (),
               parent_chain: str | None = None, require_self_contained: bool = False,
               replace_invalid: bool = False) -> Ingested | None:
        """Download, unpack and publish one layer.

        ``lowers``: the parent chain's root fs (for directories the layer omits);
        ``parent_chain``: its chainID, recorded when the layer depends on it.
        With ``require_self_contained`` a layer that omits parent directories is
        discarded and None returned: the caller retries once the parent chain
        exists (layers of an image unpack in parallel, optimistically).
        """
        work = self.layout.make_work_dir("layer-")
        try:
            result, downloaded = self._unpack(ref, spec, work / LAYERFS, lowers)
            depends = result.depends_on_parent_chain
            if depends and require_self_contained:
                log.info("layer %s omits parent directories %s; unpacking it again on its parent chain",
                         spec.digest, ", ".join(result.implicit_parents[:5]))
                return None
            meta = LayerMetadata(
                id=parse_digest(result.diff_id).hex,
                compressed_diff_digest=spec.digest,
                diff_digest=result.diff_id,
                diff_size=result.diff_size,
                whiteouts=result.whiteouts,  # type: ignore[arg-type]
                parent_chain=parent_chain if depends else None,
            )
            md = work / METADATA_DIR
            md.mkdir(mode=0o755)
            (md / LAYERS_JSON).write_bytes(meta.to_bytes())
            (md / ORIGIN_JSON).write_bytes(origin_json_bytes([config_digest]))
            os.chmod(work, 0o755)  # mkdtemp made it 0700; readers are not all root
            if self.durable:
                syncfs(work)
            dest = self.layout.layer_dir(spec.digest)
            if replace_invalid and os.path.lexists(dest):
                exchange_dirs(work, dest, self.layout.root)  # work now holds the old, unusable dir
            elif not publish_dir(work, dest, self.layout.root, durable=self.durable):
                # Published meanwhile by someone else: theirs is as good as ours.
                theirs, why = self.present(spec)
                if theirs is None:
                    raise RuntimeError(f"layer {spec.digest}: {why}")
                return Ingested(spec, theirs, self.layout.layerfs(spec.digest), downloaded)
            return Ingested(spec, meta, self.layout.layerfs(spec.digest), downloaded)
        finally:
            remove_tree(work)

    def unpack_private(self, ref: Reference, spec: LayerSpec, lowers: Sequence[Path]) -> PrivateUnpack:
        """Unpack a layer on a specific parent chain for a single chain build (its
        published dir was completed on another parent chain)."""
        work = self.layout.make_work_dir("private-")
        try:
            result, _ = self._unpack(ref, spec, work / LAYERFS, lowers)
        except BaseException:
            remove_tree(work)
            raise
        return PrivateUnpack(work, work / LAYERFS, result)

    # -- back-links ---------------------------------------------------------------------
    def add_origins(self, layer_digest: str, config_digests: Sequence[str]) -> bool:
        """Add images' config digests to the layer's origin.json (DUCC compatibility), in
        one write; True when the file changed."""
        path = self.layout.origin_json(layer_digest)
        with self._origin_lock:
            try:
                current = read_origin_json(path)
            except FileNotFoundError:
                current = []
            except ValueError as e:
                log.warning("layer %s: rewriting unreadable origin.json (%s)", layer_digest, e)
                current = []
            had = set(current)
            if all(c in had for c in config_digests):
                return False
            # via the layout: the temp file lives under .tmp, never next to the real one
            self.layout.atomic_write_file(path, origin_json_bytes([*current, *config_digests]))
            return True


__all__ = ["LayerConflict", "LayerSpec", "Ingested", "LayerIngester", "PrivateUnpack"]
