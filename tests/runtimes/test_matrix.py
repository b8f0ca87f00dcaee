"""The real stack on the runtimes sites run: containerd 2.1 (sid), 2.3 (sid with the 2.3.4
release binaries in front, from ../shared/containerd) and 1.7 (trixie), each in its own Debian
root fs, configured with the files docs/snapshotter.md shows (docs/containerd/).

Which case runs where (the tier must fit the CI's hour on 2 cores): everything on sid
(containerd 2.1 and 2.3, Docker 28); on trixie (containerd 1.7) the core: our pull, CRI, the
per-layer mix and restarts. Proof of "no download": blob GETs in the registry's access log,
with the published layers' blobs deleted from the registry."""
from __future__ import annotations

import pytest

from tests.e2e.repo_writer import publish_ducc_style, publish_layers

from .stack import DOCKER_RUNTIME_FILES, RUNTIMES, SID23_RT, SID_RT, Runtime, Stack, repo_in

pytestmark = [pytest.mark.e2e, pytest.mark.runtimes]

ALL = pytest.mark.parametrize("rt", RUNTIMES, ids=lambda r: r.id)
SID_ONLY = pytest.mark.parametrize("rt", [SID_RT, SID23_RT], ids=lambda r: r.id)


def published_stack(stack_factory, rt: Runtime, reg, img, layers, *, delete_blobs: bool = True) -> Stack:
    """A stack whose repository (/w/repo) holds `layers` of `img`; their blobs deleted."""
    def publish(c) -> None:
        publish_layers(reg.host, img, repo_in(c), layers)

    stack = stack_factory(rt, registries=[reg.url], before_start=publish)
    if delete_blobs:
        for i in layers:
            reg.delete_blob_files(img.layers[i])  # a download attempt would now fail
    reg.clear_log()
    return stack


@ALL
def test_our_pull_downloads_no_layer(rt, own_registry, stack_factory):
    reg, images = own_registry
    img = images.multilayer
    stack = published_stack(stack_factory, rt, reg, img, range(len(img.layers)))
    res = stack.our_pull(img.ref)
    assert f"{len(img.layers)} layers from the repository, 0 downloaded" in res.stderr, res.stderr
    assert reg.blob_get_count() == 1  # the config only
    # The command handed the pull to the snapshotter over its default control socket.
    assert f"pull of {img.ref} into namespace default: done" in \
        (stack.c.host_w / "snapshotter.log").read_text(errors="replace")
    stack.assert_tree(img)


@ALL
def test_cri_pull_downloads_no_layer(rt, own_registry, stack_factory):
    reg, images = own_registry
    img = images.multilayer
    stack = published_stack(stack_factory, rt, reg, img, range(len(img.layers)))
    # No plain-http flag anywhere: CRI finds the registry through the documented hosts.toml.
    assert stack.cri_pull(img.ref).startswith("sha256:")
    assert reg.blob_get_count() == 1
    assert stack.served_from_repository() == len(img.layers)
    stack.assert_tree(img, namespace="k8s.io")


@SID_ONLY
def test_plain_ctr_image_pull_downloads_no_layer(rt, own_registry, stack_factory):
    """containerd 2.x: the transfer service with the documented unpack_config is enough."""
    reg, images = own_registry
    img = images.multilayer
    stack = published_stack(stack_factory, rt, reg, img, range(len(img.layers)))
    stack.ctr(f"image pull --plain-http --snapshotter cvmfs-snapshotter {img.ref}")
    assert reg.blob_get_count() == 1
    assert stack.served_from_repository() == len(img.layers)
    stack.assert_tree(img)


@SID_ONLY
def test_docker_pull_and_run_with_containerd_image_store(rt, own_registry, stack_factory):
    reg, images = own_registry
    img = images.multilayer
    stack = published_stack(stack_factory, rt, reg, img, range(len(img.layers)))
    stack.start_dockerd()
    info = stack.sh("docker info --format '{{.Driver}} {{.ServerVersion}}'").stdout
    assert info.startswith("cvmfs-snapshotter "), info
    stack.sh(f"docker pull {img.ref}")
    assert reg.blob_get_count() == 1
    stack.assert_tree(img, listing=stack.docker_listing(img.ref), runtime_files=DOCKER_RUNTIME_FILES)


@ALL
def test_half_the_layers_in_the_repository(rt, own_registry, stack_factory):
    """Our pull downloads exactly the layers the repository lacks."""
    reg, images = own_registry
    img = images.multilayer
    stack = published_stack(stack_factory, rt, reg, img, [0, 2])
    res = stack.our_pull(img.ref)
    assert "2 layers from the repository, 1 downloaded" in res.stderr, res.stderr
    assert reg.blob_get_count(img.layers[1]) == 1
    assert reg.blob_get_count() == 2  # that layer and the config
    stack.assert_tree(img)


@SID_ONLY
def test_half_the_layers_with_plain_ctr_image_pull(rt, own_registry, stack_factory):
    """containerd's own unpacker serves the published layers remotely too, but from the first
    layer it must download it fetches every later blob as well (unpacker: fetch(layers[i:]))."""
    reg, images = own_registry
    img = images.multilayer
    stack = published_stack(stack_factory, rt, reg, img, [0, 2], delete_blobs=False)
    stack.ctr(f"image pull --plain-http --snapshotter cvmfs-snapshotter {img.ref}")
    assert reg.blob_get_count(img.layers[0]) == 0
    assert reg.blob_get_count(img.layers[1]) == 1
    print(f"blob GETs: config {reg.blob_get_count(img.config_digest)}, layers "
          f"{[reg.blob_get_count(d) for d in img.layers]}")
    assert stack.served_from_repository() == 2, stack.logs()
    stack.assert_tree(img)


@SID_ONLY
def test_ducc_written_repository(rt, own_registry, stack_factory):
    reg, images = own_registry
    img = images.multilayer

    def publish(c) -> None:
        publish_ducc_style(reg.host, img, repo_in(c))

    stack = stack_factory(rt, registries=[reg.url], before_start=publish)
    for digest in img.layers:
        reg.delete_blob_files(digest)
    reg.clear_log()
    stack.ctr(f"image pull --plain-http --snapshotter cvmfs-snapshotter {img.ref}")
    assert reg.blob_get_count() == 1
    # Raw `.wh.` layer dirs are never served as lowers: the chains are, deletions stay deleted.
    stack.assert_tree(img)


@ALL
def test_snapshotter_restart_keeps_containers_starting(rt, own_registry, stack_factory):
    reg, images = own_registry
    img, other = images.multilayer, images.tagged["2.0"]  # `other` shares no layer with `img`
    stack = published_stack(stack_factory, rt, reg, img, range(len(img.layers)))
    stack.our_pull(img.ref)
    before = sorted(map(tuple, stack.snapshots()))
    stack.restart_snapshotter("KILL")      # a crash: nothing shut down cleanly
    assert sorted(map(tuple, stack.snapshots())) == before
    stack.assert_tree(img)
    stack.restart_snapshotter("TERM")
    stack.assert_tree(img)
    # And it still pulls: an image the repository lacks, downloaded and unpacked.
    res = stack.our_pull(other.ref)
    assert f"0 layers from the repository, {len(other.layers)} downloaded" in res.stderr, res.stderr
    stack.assert_tree(other)
