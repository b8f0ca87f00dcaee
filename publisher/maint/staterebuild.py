"""``cvmfs-publisher state rebuild``: a new state DB from what the repository shows.

Every ``.metadata/<registry>/<repo>:<tag>/manifest.json`` (at the root: the default
platform; under ``.multiarch/<arch>[:<variant>]/``: that platform) with its
``config.json`` becomes a published tag and its image; each layer's
``.layers/<xx>/<hex>/.metadata/layers.json`` gives the layer row. What the
repository cannot tell is left empty: wishlist entries and runs (the next convert
records them) and errors. The index a tag pointed at comes from ``index.json`` when it
is there and lists the tag's manifest; else ``top_digest`` is the manifest, and a tag that
names an index is resolved again by the next convert, without fetching layers.

The repository is read as untrusted input, like convert reads a registry: metadata
files are opened only when regular (no symlink followed, no FIFO or device waited on)
and read with a size cap, JSON nested beyond the parser is a skipped tag, and the walk
of ``.metadata`` is iterative and depth-bounded.

The new DB is written next to the old one and renamed over it; the old one is kept
as ``<state-db>.broken-<unix time>``. Under the state and repository locks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.fsutil.bounded import read_regular
from cvmfs_common.oci.digest import InvalidDigest, chain_ids, parse_digest, sha256_of
from cvmfs_common.repo.paths import (DEFAULT_VARIANTS, MANIFEST_JSON, METADATA_DIR, LayoutError, RepositoryLayout,
    multiarch_name_of_dir, platform_dir_name)
from cvmfs_common.repo.metadata import LayerMetadata, MetadataError
from cvmfs_common.oci.platform import Platform

from cvmfs_common.repo.paths import CONFIG_JSON, INDEX_JSON
from publisher.core.runlock import exclusive, exclusive_repository, lock_path_for
from publisher.core.state import ImageRecord, LayerRecord, State, TagKey

log = logging.getLogger(__name__)

_DIGEST_TAG = re.compile(r"^(.+):(sha256:[0-9a-f]{64})$")


@dataclass
class RebuildReport:
    tags: int = 0
    images: int = 0
    layers: int = 0
    skipped: list[str] = field(default_factory=list)  # metadata dirs that could not be used, with why
    kept: Path | None = None  # the old DB, renamed

    def render(self) -> str:
        lines = [f"state rebuild: {self.tags} tags, {self.images} images, {self.layers} layers"
                 + (f"; the old state DB is kept as {self.kept}" if self.kept else "")]
        lines += [f"  SKIPPED {s}" for s in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Found:
    key: TagKey
    platform_dir: str
    record: ImageRecord
    top_digest: str  # what the tag pointed at: its index (index.json) or the manifest


# Caps on what one metadata file may hold (the registry client's own limits for manifests
# and configs; a layers.json is a few hundred bytes).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_LAYERS_JSON_BYTES = 1024 * 1024
# .metadata/<registry>/<repository components>:<tag>: a repository name has at most 255
# characters, so at most 128 components
MAX_METADATA_DEPTH = 130
_PARSE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, InvalidDigest,
                 MetadataError)


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _top_digest(directory: Path, manifest_digest: str) -> str:
    """The digest of the tag's index.json when it is an index listing `manifest_digest`
    (what a HEAD of the tag answered when it was published), else the manifest's."""
    try:
        raw = read_regular(directory / INDEX_JSON, MAX_MANIFEST_BYTES)
        entries = _json(raw).get("manifests")  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError):
        return manifest_digest
    listed = isinstance(entries, list) and any(isinstance(e, dict) and e.get("digest") == manifest_digest
                                               for e in entries)
    return sha256_of(raw) if listed else manifest_digest


def _metadata_dirs(metadata_root: Path, report: RebuildReport) -> list[tuple[str, Path]]:
    """(``<registry>/<repo>:<tag>``, dir) of every dir holding a manifest.json: a walk
    without recursion or symlinks, no deeper than a tag's name can be (deeper trees are
    reported once per metadata root, not walked)."""
    out = []
    todo: list[tuple[Path, int]] = [(metadata_root, 0)]
    too_deep = None
    while todo:
        top, depth = todo.pop()
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        names = {e.name for e in entries}
        if MANIFEST_JSON in names:
            out.append((os.path.relpath(top, metadata_root), top))
        subdirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        if subdirs and depth >= MAX_METADATA_DEPTH:
            too_deep = too_deep or top
            continue
        todo.extend((Path(e.path), depth + 1) for e in reversed(subdirs))
    if too_deep is not None:
        report.skipped.append(f"{os.path.relpath(too_deep, metadata_root.parent)}/...: deeper than "
                              f"{MAX_METADATA_DEPTH} levels, not a tag name; not read")
    return sorted(out)


def _split_name(rel: str) -> tuple[str, str, str]:
    registry, _, rest = rel.partition("/")
    m = _DIGEST_TAG.match(rest)
    repository, tag = (m.group(1), m.group(2)) if m else rest.rpartition(":")[::2]
    if not registry or not repository or not tag:
        raise ValueError(f"{rel!r} is not <registry>/<repository>:<tag>")
    return registry, repository, tag


def _config_platform(config: dict) -> Platform | None:
    try:
        return Platform(str(config["os"]), str(config["architecture"]), config.get("variant") or None)
    except (KeyError, TypeError):
        return None


class _Reader:
    def __init__(self, layout: RepositoryLayout) -> None:
        self.layout = layout
        self.layer_meta: dict[str, LayerMetadata] = {}

    def image(self, directory: Path, platform: str) -> ImageRecord:
        manifest_bytes = read_regular(directory / MANIFEST_JSON, MAX_MANIFEST_BYTES)
        config_bytes = read_regular(directory / CONFIG_JSON, MAX_CONFIG_BYTES)
        manifest, config = _json(manifest_bytes), _json(config_bytes)
        config_digest = str(parse_digest(manifest["config"]["digest"]))
        if sha256_of(config_bytes) != config_digest:
            raise ValueError(f"config.json is not {config_digest}")
        diff_ids = [str(parse_digest(d)) for d in config["rootfs"]["diff_ids"]]
        descs = manifest["layers"]
        if not descs or len(descs) != len(diff_ids):
            raise ValueError(f"{len(descs)} layers, {len(diff_ids)} diffIDs")
        chains = chain_ids(diff_ids)
        layers = []
        for i, (desc, diff) in enumerate(zip(descs, diff_ids)):
            digest = str(parse_digest(desc["digest"]))
            meta = self.layer(digest)
            if meta.diff_digest != diff:
                raise ValueError(f"layer {digest}: layers.json says diff {meta.diff_digest}, the config {diff}")
            layers.append(LayerRecord(digest, diff, int(desc.get("size", 0)), meta.diff_size, meta.whiteouts,
                                      meta.parent_chain, chains[i]))
        media_type = manifest.get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
        return ImageRecord(sha256_of(manifest_bytes), config_digest, str(media_type), platform, layers)

    def layer(self, digest: str) -> LayerMetadata:
        if digest not in self.layer_meta:
            try:
                self.layer_meta[digest] = LayerMetadata.from_bytes(
                    read_regular(self.layout.layers_json(digest), MAX_LAYERS_JSON_BYTES))
            except FileNotFoundError:
                raise ValueError(f"layer {digest} has no layers.json in the repository") from None
        return self.layer_meta[digest]


def _platform_dir_of_multiarch(name: str) -> str | None:
    """``arm64:v8`` -> ``linux-arm64``: the state's platform dir for a ``.multiarch`` name.
    A variant that is the architecture's default is left out, as wishlists spell it
    (``linux/arm64``); only Linux platforms get ``.multiarch`` dirs."""
    arch, _, variant = name.partition(":")
    if variant and DEFAULT_VARIANTS.get(arch) == variant:
        variant = ""
    try:
        pdir = platform_dir_name("linux", arch, variant or None)
        return pdir if multiarch_name_of_dir(pdir) == name else None
    except LayoutError:
        return None


def _scan(layout: RepositoryLayout, report: RebuildReport) -> tuple[list[_Found], str | None]:
    """Every published tag the repository shows, and the default platform."""
    reader = _Reader(layout)
    places: list[tuple[str, RepositoryLayout, str | None]] = [("", layout, None)]
    for entry in sorted(os.scandir(layout.multiarch_dir), key=lambda e: e.name) if layout.multiarch_dir.is_dir() \
            else []:
        # Real arch dirs only (the others are alias links); the default platform's has no .metadata.
        if not entry.is_dir(follow_symlinks=False) or not os.path.isdir(os.path.join(entry.path, METADATA_DIR)):
            continue
        pdir = _platform_dir_of_multiarch(entry.name)
        if pdir is None:
            report.skipped.append(f"{os.path.relpath(entry.path, layout.root)}: not an <arch>[:<variant>] name")
            continue
        places.append((pdir, RepositoryLayout(layout.root, pdir), pdir.replace("-", "/")))
    found: list[_Found] = []
    root_platforms: Counter[str] = Counter()
    pending_root: list[tuple[str, Path, dict]] = []
    for pdir, lay, platform in places:
        for rel, directory in _metadata_dirs(lay.metadata_root, report):
            where = os.path.relpath(directory, layout.root)
            try:
                registry, repository, tag = _split_name(rel)
                lay.manifest_json(registry, repository, tag)  # the names are valid ones
                if platform is None:  # the default platform: decided once all are read
                    config = _json(read_regular(directory / CONFIG_JSON, MAX_CONFIG_BYTES))
                    plat = _config_platform(config)
                    if plat is not None:
                        root_platforms[str(plat)] += 1
                    pending_root.append((rel, directory, {"key": (registry, repository, tag)}))
                    continue
                record = reader.image(directory, platform)
                found.append(_Found(TagKey(registry, repository, tag, platform), pdir, record,
                                    _top_digest(directory, record.manifest_digest)))
            except _PARSE_ERRORS as e:
                report.skipped.append(f"{where}: {e}")
    default = root_platforms.most_common(1)[0][0] if root_platforms else None
    if pending_root and default is None:
        default = str(Platform.host())
    for rel, directory, info in pending_root:
        registry, repository, tag = info["key"]
        try:
            record = reader.image(directory, default)  # type: ignore[arg-type]
            found.append(_Found(TagKey(registry, repository, tag, default), "", record,  # type: ignore[arg-type]
                                _top_digest(directory, record.manifest_digest)))
        except _PARSE_ERRORS as e:
            report.skipped.append(f"{os.path.relpath(directory, layout.root)}: {e}")
    return found, default


def rebuild(root: Path, state_db: Path) -> RebuildReport:
    """Replace ``state_db`` by one rebuilt from the repository at ``root``."""
    layout = RepositoryLayout(root)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"no repository at {root}")
    report = RebuildReport()
    state_db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path_for(state_db)), exclusive_repository(root):
        found, default = _scan(layout, report)
        new = state_db.with_name(f"{state_db.name}.rebuild-{os.getpid()}")
        for p in (new, Path(f"{new}-wal"), Path(f"{new}-shm")):
            p.unlink(missing_ok=True)
        try:
            with State.open(new, root) as state:
                if default is not None:
                    state.default_platform(default)
                for f in found:
                    state.record_published(f.key, f.platform_dir, None, f.top_digest, f.record)
                state.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            report.tags = len(found)
            report.images = len({f.record.manifest_digest for f in found})
            report.layers = len({l.digest for f in found for l in f.record.layers})
            if state_db.exists():
                report.kept = state_db.with_name(f"{state_db.name}.broken-{int(time.time())}")
                os.rename(state_db, report.kept)
            for suffix in ("-wal", "-shm"):  # the old DB's: they must not be applied to the new one
                old = Path(f"{state_db}{suffix}")
                if report.kept is not None and old.exists():
                    os.rename(old, f"{report.kept}{suffix}")
                old.unlink(missing_ok=True)
            os.rename(new, state_db)
        finally:
            for p in (new, Path(f"{new}-wal"), Path(f"{new}-shm")):
                p.unlink(missing_ok=True)
    log.info("state rebuilt from %s: %d tags", root, report.tags)
    return report


__all__ = ["RebuildReport", "rebuild"]
