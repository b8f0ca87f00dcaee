"""`cvmfs-snapshotter pull`: what containerd's unpacker does, over containerd's API,
downloading only the layers no repository has (docs/DESIGN.md#pull).

Under a lease: store config + manifest with gc labels, prepare each layer through
containerd with the ref and layer-digest labels (our snapshotter answers ALREADY_EXISTS
for layers it serves from a repository), fetch + Apply + Commit only the rest, label the
config with the top chainID for our snapshotter, create the image record. `ctr image
pull` (1.6) cannot do this: it downloads every blob before unpacking.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import grpc

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.oci.reference import Reference
from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.client import RegistryClient
from cvmfs_common.registry.manifest import ResolvedImage
from cvmfs_common.registry.published import PublishedFiles, match_published

from .containerd_client import ContainerdClient, unique_key_part
from ..labels import CVMFS_LAYER_DIGEST_LABEL, SNAPSHOT_REF_LABEL

log = logging.getLogger(__name__)

SNAPSHOTTER_NAME = "cvmfs-snapshotter"


class PullError(RuntimeError):
    pass


@dataclass
class PullResult:
    image: str
    manifest_digest: str
    top_chain_id: str
    layers: int = 0
    from_repository: int = 0  # answered ALREADY_EXISTS by the snapshotter: no download
    already_present: int = 0  # the snapshot existed before this pull
    downloaded: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    sources: list[str] = field(default_factory=list)


@dataclass
class Progress:
    """Human progress on a stream (stderr by default); quiet in tests if wanted."""

    out: TextIO | None = sys.stderr

    def say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def check(self) -> None:
        """Called between steps and per downloaded chunk: a daemon's pull raises here when it
        is cancelled (client gone, timeout), and the usual clean-up runs."""


# (registry, repository, tag, platform) -> the metadata files repositories hold for that tag
PublishedLookup = Callable[[str, str, str, Platform], "list[PublishedFiles]"]


def _from_repository(registry: RegistryClient, ref: Reference, src: Reference, want: Platform,
                     published: PublishedLookup) -> tuple[ResolvedImage, bytes, dict] | None:
    """The image from a repository's copy of the tag's manifest and config, when they are
    what the registry has now (one HEAD, or none for a reference by digest); else None."""
    try:
        files = published(*ref.link_components, want)
    except (ValueError, OSError) as e:  # a name the layout refuses, an unreadable repository
        log.debug("no repository lookup for %s: %s", ref, e)
        return None
    if not files:
        return None
    top = src.digest or registry.head_manifest(src)
    if top is None:
        return None  # the registry says the tag is gone: let resolve() say so
    for f in files:
        match = match_published(src, top, want, f)
        if match is not None:
            log.info("%s: manifest and config of %s from %s", ref, top, f.where)
            return match
    log.info("%s: the repository's copy is not the tag's %s; resolving at the registry", ref, top)
    return None


def _counting(chunks, counter: Callable[[int], None]):
    for chunk in chunks:
        counter(len(chunk))
        yield chunk


def pull_image(
    client: ContainerdClient,
    registry: RegistryClient,
    reference: str,
    snapshotter: str = SNAPSHOTTER_NAME,
    platform: Platform | None = None,
    progress: Progress | None = None,
    source: Reference | None = None,
    published: PublishedLookup | None = None,
) -> PullResult:
    """Pull `reference` into containerd under its own name; with `source` (a mirror of it,
    from hosts.toml) the registry requests go there. With `published` (the serving daemon's
    repositories) a tag the repository holds as of the tag's HEAD costs that one HEAD: the
    manifest and config come from the repository, checked against the digests."""
    progress = progress or Progress()
    started = time.monotonic()
    ref = registry.reference(reference)
    src = source or ref
    known = _from_repository(registry, ref, src, platform or Platform.host(), published) if published else None
    if known is not None:
        image, config_bytes, config = known
    else:
        image = registry.resolve(src, platform)
        config_bytes, config = registry.fetch_config(image)
    diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
    if len(diff_ids) != len(image.layers):
        raise PullError(f"{ref}: config lists {len(diff_ids)} diff_ids for {len(image.layers)} layers")
    chains = chain_ids(diff_ids) if diff_ids else []
    top = chains[-1] if chains else ""
    name = ref.docker_name
    result = PullResult(name, image.manifest_digest, top, layers=len(image.layers))
    progress.say(f"{name}: manifest {image.manifest_digest}, {len(image.layers)} layers"
                 + (" (manifest and config from the repository)" if known is not None else ""))

    with client.leased():
        config_labels = {f"containerd.io/gc.ref.snapshot.{snapshotter}": top} if top else {}
        if not client.write_content(image.config.digest, len(config_bytes), [config_bytes], config_labels):
            if config_labels:
                client.set_content_labels(image.config.digest, config_labels)
        manifest_labels = {"containerd.io/gc.ref.content.config": image.config.digest}
        for i, layer in enumerate(image.layers):
            manifest_labels[f"containerd.io/gc.ref.content.l.{i}"] = layer.digest
        if not client.write_content(
            image.manifest_digest, len(image.manifest_bytes), [image.manifest_bytes], manifest_labels
        ):
            client.set_content_labels(image.manifest_digest, manifest_labels)

        present = _present(client, snapshotter, chains)
        parent = ""
        for i, (layer, chain) in enumerate(zip(image.layers, chains), start=1):
            tag = f"layer {i}/{len(image.layers)} {layer.digest[:19]}"
            _with_retries(lambda: _layer(client, registry, src, snapshotter, layer, chain, parent, tag, progress,
                                         result, present), progress, tag)
            parent = chain
        client.put_image(name, image.media_type, image.manifest_digest, len(image.manifest_bytes), {})
    result.seconds = time.monotonic() - started
    progress.say(
        f"{name}: done in {result.seconds:.1f}s: {result.from_repository} layers from the repository, "
        f"{result.downloaded} downloaded ({result.bytes_downloaded / 1e6:.1f} MB), "
        f"{result.already_present} already present"
    )
    return result


def _with_retries(step: Callable[[], None], progress: Progress, tag: str, attempts: int = 5) -> None:
    """containerd answers UNAVAILABLE while it re-dials a restarted snapshotter: retry."""
    for attempt in range(1, attempts + 1):
        progress.check()
        try:
            return step()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts:
                raise
            progress.say(f"  {tag}: snapshotter unavailable ({e.details()}), retrying")
            time.sleep(0.5 * attempt)


def _present(client: ContainerdClient, snapshotter: str, chains: list[str]) -> set[str] | None:
    """The chains containerd has already, asked in parallel; None: ask layer by layer (the
    snapshotter is restarting, say, and each layer's retries will wait for it)."""
    try:
        return client.existing_snapshots(snapshotter, chains)
    except grpc.RpcError:
        return None


def _layer(client: ContainerdClient, registry: RegistryClient, ref, snapshotter: str, layer, chain: str,
           parent: str, tag: str, progress: Progress, result: PullResult, present: set[str] | None = None) -> None:
    """One layer, as containerd's unpacker does it: served remotely, present, or unpacked.
    `present` (chains that existed when the pull started) saves a Stat per layer."""
    if chain in present if present is not None else client.stat_snapshot(snapshotter, chain):
        result.already_present += 1
        progress.say(f"  {tag}: already unpacked")
        return
    key = f"extract-{unique_key_part()} {chain}"
    labels = {SNAPSHOT_REF_LABEL: chain, CVMFS_LAYER_DIGEST_LABEL: layer.digest}
    mounts = client.prepare_snapshot(snapshotter, key, parent, labels)
    if mounts is None:
        result.from_repository += 1
        progress.say(f"  {tag}: from the repository, no download")
        return
    try:
        _download_and_apply(client, registry, ref, layer, mounts, progress, tag, result)
        committed = client.commit_snapshot(snapshotter, chain, key, {SNAPSHOT_REF_LABEL: chain})
    except BaseException:
        try:
            client.remove_snapshot(snapshotter, key)
        except grpc.RpcError:
            log.warning("could not remove %s after a failed unpack; containerd's GC will", key)
        raise
    if not committed:  # a concurrent pull unpacked the same layer first: use theirs
        client.remove_snapshot(snapshotter, key)
        progress.say(f"  {tag}: unpacked concurrently by another pull")
    result.downloaded += 1


def _download_and_apply(client, registry, ref, layer, mounts, progress: Progress, tag: str, result: PullResult) -> None:
    if not client.content_exists(layer.digest):
        done = [0]
        last = [time.monotonic()]

        def count(n: int) -> None:
            progress.check()
            done[0] += n
            result.bytes_downloaded += n
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                progress.say(f"  {tag}: {done[0] / 1e6:.1f}/{layer.size / 1e6:.1f} MB")

        def chunks():
            done[0] = 0
            return _counting(registry.iter_blob(ref, layer.digest, layer.size), count)

        client.write_content(layer.digest, layer.size, chunks, {})
        progress.say(f"  {tag}: downloaded {done[0] / 1e6:.1f} MB")
    client.apply(layer.media_type, layer.digest, layer.size, mounts)
