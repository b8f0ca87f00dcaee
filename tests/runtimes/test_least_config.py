"""The least containerd config (docs/containerd/config-v*-minimal.toml: the proxy plugin, the
transfer service's unpack_config on 2.x, CRI's snapshotter; no label settings) on containerd 1.7
(trixie), 2.1 (sid) and 2.3 (sid + the release binaries), for plain `ctr image pull`, CRI
PullImage and `docker pull` (containerd image store).

containerd's unpacker names each layer's Prepare by chainID, and from 2.3 by diffID too. So a
repository as the publisher writes it (`.layers` + `.diffids` + `.chains`) is served on every
release, and one holding only layer dirs (another image's chains, DUCC's private chain names)
is served layer by layer where the diffID is sent (2.3), the bottom layer elsewhere (its chainID
is its diffID). Layers the repository does not serve are pulled normally, in the same pull.
Proof: per-layer blob GETs in the registry's access log (blobs kept: the rest must download)."""
from __future__ import annotations

import pytest

from tests.e2e.repo_writer import publish_chains, publish_layers

from .stack import DOCKER_RUNTIME_FILES, SID23_RT, SID_RT, TRIXIE_RT, Stack, repo_in

pytestmark = [pytest.mark.e2e, pytest.mark.runtimes]


def layer_gets(reg, img) -> list[int]:
    return [reg.blob_get_count(d) for d in img.layers]


def served(stack: Stack, since: int) -> int:
    """Prepares answered from the repository since `since` (a layer already served in another
    namespace is answered from the snapshot made then)."""
    return (stack.c.host_w / "snapshotter.log").read_text(errors="replace")[since:].count(" exists in repository ")


def forget_images(stack: Stack, namespace: str) -> None:
    """Remove the namespace's images with a synchronous GC: containerd shares a blob one namespace
    downloaded with every other (no GET), which would hide the next pull path's own GETs."""
    stack.ctr("image ls -q | xargs -r ctr -n {ns} image rm --sync".format(ns=namespace), namespace=namespace)


def log_size(stack: Stack) -> int:
    return len((stack.c.host_w / "snapshotter.log").read_text(errors="replace"))


@pytest.mark.parametrize("kind", ["chains", "layers"])
@pytest.mark.parametrize("rt", [SID23_RT, SID_RT, TRIXIE_RT], ids=lambda r: r.id)
def test_least_config_pulls_no_layer_the_repository_serves(rt, kind, own_registry, stack_factory):
    reg, images = own_registry
    img = images.multilayer
    n = len(img.layers)

    def publish(c) -> None:
        repo = repo_in(c)
        publish_layers(reg.host, img, repo, range(n))
        if kind == "chains":
            publish_chains(img, repo)

    stack = stack_factory(rt, registries=[reg.url], before_start=publish, config=rt.minimal)
    by_diff_id = rt.containerd >= "2.3"
    # Served: every layer when the chains are there or containerd sends the diffID; else the bottom one.
    want = [0] * n if kind == "chains" or by_diff_id else [0] + [1] * (n - 1)
    results = {}

    if rt.major >= 2:  # containerd 1.x's ctr fetches every blob before it unpacks
        reg.clear_log()
        mark = log_size(stack)
        stack.ctr(f"image pull --plain-http --snapshotter cvmfs-snapshotter {img.ref}")
        results["ctr image pull"] = layer_gets(reg, img)
        assert served(stack, mark) == want.count(0), stack.logs()
        stack.assert_tree(img)
        forget_images(stack, "default")

    reg.clear_log()
    mark = log_size(stack)
    assert stack.cri_pull(img.ref).startswith("sha256:")
    results["CRI"] = layer_gets(reg, img)
    assert served(stack, mark) == want.count(0), stack.logs()
    stack.assert_tree(img, namespace="k8s.io")
    forget_images(stack, "k8s.io")

    if rt.release == "sid":
        stack.start_dockerd()
        reg.clear_log()
        stack.sh(f"docker pull {img.ref}")
        results["docker pull"] = layer_gets(reg, img)
        stack.assert_tree(img, listing=stack.docker_listing(img.ref), runtime_files=DOCKER_RUNTIME_FILES)

    print(f"\nblob GETs per layer, containerd {rt.containerd}, least config, repository with {kind}: {results}")
    for path, gets in results.items():
        # dockerd pulls with its own containerd client and always adds the blob digest labels
        # (moby: snapshotters.AppendInfoHandlerWrapper), whatever containerd's config.
        assert gets == ([0] * n if path == "docker pull" else want), (path, gets)


@pytest.mark.parametrize("rt, kind", [(SID_RT, "publisher"), (SID23_RT, "publisher"), (SID23_RT, "layers")],
                         ids=["sid-containerd2.1-publisher", "sid-containerd2.3-publisher", "sid-containerd2.3-layers"])
def test_least_config_serves_the_image_recompressed(rt, kind, own_registry, stack_factory, tmp_path):
    """The repository has the gzip image; the registry serves it again with zstd layers (other
    blob digests, the same diffIDs and chainIDs; their blobs deleted: a GET fails the pull).
    "publisher": written by `cvmfs-publisher convert-image`, found by chainID (.chains) on
    every release. "layers": layer dirs and .diffids only, found by diffID on 2.3."""
    from tests.fixtures.images import push_zstd_multilayer
    from tests.publisher.clirun import run_cli

    reg, images = own_registry
    img = images.multilayer
    zimg = push_zstd_multilayer(reg.host, tmp_path)
    assert zimg.diff_ids == img.diff_ids and not set(zimg.layers) & set(img.layers)

    def publish(c) -> None:
        repo = repo_in(c)
        if kind == "publisher":
            res = run_cli("convert-image", img.ref, "--repository-root", repo.root,
                          "--state-db", tmp_path / "state.db")
            assert res.rc == 0, res.stdout
        else:
            publish_layers(reg.host, img, repo, range(len(img.layers)))

    stack = stack_factory(rt, registries=[reg.url], before_start=publish, config=rt.minimal)
    for digest in zimg.layers:
        reg.delete_blob_files(digest)
    reg.clear_log()
    stack.ctr(f"image pull --plain-http --snapshotter cvmfs-snapshotter {zimg.ref}")
    assert layer_gets(reg, zimg) == [0] * len(zimg.layers)
    stack.assert_tree(zimg)
    reg.clear_log()
    assert stack.cri_pull(zimg.ref).startswith("sha256:")
    assert layer_gets(reg, zimg) == [0] * len(zimg.layers)
    stack.assert_tree(zimg, namespace="k8s.io")
