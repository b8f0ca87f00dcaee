"""Remote layers through the real stack: containerd 1.6 + cvmfs-snapshotter + docker-registry.

Proof of "no download": blob GETs in the registry's access log, with the blobs of the
published layers deleted from the registry, and a containerd root of the test's own."""

from __future__ import annotations

import time

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.e2e.pulls import cvmfs_pull
from tests.e2e.repo_writer import publish_ducc_style, publish_layers
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing

pytestmark = pytest.mark.e2e

@pytest.fixture
def repo(e2e_base, tmp_path_factory):
    from tests.fixtures.workdirs import new_workdir

    return RepositoryLayout(new_workdir("repo-", e2e_base))


def check_tree(cd, image, namespace="default"):
    out = cd.run(image.ref, *LISTING_COMMAND, namespace=namespace).stdout
    problems = compare_trees(image.tree, parse_listing(out))
    assert not problems, "\n".join(problems)


def test_image_fully_in_repository_starts_with_no_download(own_registry, repo, snapshotter_factory,
                                                          containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    for digest in img.layers:
        reg.delete_blob_files(digest)  # any download attempt would now fail
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    reg.clear_log()
    res = cvmfs_pull(cd, img.ref)
    assert f"{len(img.layers)} layers from the repository, 0 downloaded" in res.stderr
    check_tree(cd, img)
    assert reg.blob_get_count() == 1  # the config only
    # Every committed snapshot containerd knows is served from the repository.
    assert len([s for s in cd.snapshots() if s["kind"] == "Committed"]) == len(img.layers)
    # containerd's GC cleans up after `ctr image rm`.
    cd.ctr("image", "rm", "--sync", img.ref)
    assert [s for s in cd.snapshots() if s["kind"] == "Committed"] == []


def test_half_the_layers_in_the_repository(own_registry, repo, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_layers(reg.host, img, repo, [0, 2])
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    reg.clear_log()
    res = cvmfs_pull(cd, img.ref)
    assert "2 layers from the repository, 1 downloaded" in res.stderr, res.stderr
    assert reg.blob_get_count(img.layers[1]) == 1
    assert reg.blob_get_count(img.layers[0]) == reg.blob_get_count(img.layers[2]) == 0
    check_tree(cd, img)


def test_image_not_in_repository_is_pulled_normally(own_registry, repo, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    img = images.multilayer_docker
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    reg.clear_log()
    res = cvmfs_pull(cd, img.ref)
    assert f"0 layers from the repository, {len(img.layers)} downloaded" in res.stderr
    assert all(reg.blob_get_count(d) == 1 for d in img.layers)
    check_tree(cd, img)


def test_same_image_in_two_namespaces(own_registry, repo, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    reg.clear_log()
    for ns in ("one", "two"):
        res = cvmfs_pull(cd, img.ref, namespace=ns)
        assert f"{len(img.layers)} layers from the repository" in res.stderr
        check_tree(cd, img, namespace=ns)
    assert all(reg.blob_get_count(d) == 0 for d in img.layers)


def test_ducc_written_repository_keeps_deleted_files_deleted(own_registry, repo, snapshotter_factory,
                                                           containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_ducc_style(reg.host, img, repo)
    # The raw layer dirs hold `.wh.` files: served as lowers they would show deleted files.
    assert list(repo.layerfs(img.layers[1]).rglob(".wh.*"))
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    reg.clear_log()
    res = cvmfs_pull(cd, img.ref)
    assert f"{len(img.layers)} layers from the repository" in res.stderr
    assert all(reg.blob_get_count(d) == 0 for d in img.layers)
    check_tree(cd, img)  # whiteouted files absent, opaque dir content, modes as expected


def _raw(repo: RepositoryLayout, digest: str) -> bool:
    return any(p.name.startswith(".wh.") for p in repo.layerfs(digest).rglob("*"))


@pytest.mark.parametrize("name", ["multilayer", "tagged:2.0"])
def test_ducc_repository_without_chains(own_registry, repo, snapshotter_factory, containerd_factory, name):
    """DUCC's layer dirs (raw `.wh.` files, layers.json without `whiteouts`) and no `.chains`:
    a layer dir without any `.wh.` name is served (looked at once), a layer with whiteouts is
    pulled normally -- also between served ones -- and the tree is the image's: deleted files
    stay deleted. The cost (layers pulled, seconds) is printed against the same repository
    with its chains (nothing pulled), in the same run."""
    reg, images = own_registry
    img = images.multilayer if name == "multilayer" else images.tagged[name.split(":")[1]]
    publish_ducc_style(reg.host, img, repo, chains=False)
    assert not repo.chains_dir.exists()
    raw = [d for d in img.layers if _raw(repo, d)]
    clean = [d for d in img.layers if d not in raw]
    assert raw and clean  # both kinds in each image
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    reg.clear_log()
    t0 = time.monotonic()
    res = cvmfs_pull(cd, img.ref)
    no_chains = time.monotonic() - t0
    assert f"{len(clean)} layers from the repository, {len(raw)} downloaded" in res.stderr, res.stderr
    assert all(reg.blob_get_count(d) == 0 for d in clean) and all(reg.blob_get_count(d) == 1 for d in raw)
    check_tree(cd, img)
    scans = [l for l in sn.log().splitlines() if "DUCC layer" in l and "entries looked at" in l]
    assert len(scans) == len(img.layers), scans  # each layer looked at once

    # the same-run peer: the repository as DUCC wrote it before, with its chains
    from tests.fixtures.workdirs import new_workdir

    peer_repo = RepositoryLayout(new_workdir("repo-", repo.root.parent))
    publish_ducc_style(reg.host, img, peer_repo)
    peer_sn = snapshotter_factory(repositories=[peer_repo.root])
    peer_cd = containerd_factory(peer_sn.address)
    t0 = time.monotonic()
    peer = cvmfs_pull(peer_cd, img.ref)
    with_chains = time.monotonic() - t0
    assert f"{len(img.layers)} layers from the repository, 0 downloaded" in peer.stderr
    print(f"DUCC repository without chains, {name}: {len(raw)} of {len(img.layers)} layers pulled, pull "
          f"{no_chains:.2f}s vs {with_chains:.2f}s with chains ({no_chains / with_chains:.2f}x); scans: "
          + "; ".join(l.split("DUCC layer ", 1)[1][:120] for l in scans))


def test_restart_keeps_remote_snapshots(own_registry, repo, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    cvmfs_pull(cd, img.ref)
    sn.restart()
    cd.restart()
    cd.wait_snapshotter_ready()
    check_tree(cd, img)


def test_vanished_repository_dir_gives_clear_error(own_registry, repo, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    sn = snapshotter_factory(repositories=[repo.root], extra_args=["--lookup-cache-ttl", "0"])
    cd = containerd_factory(sn.address)
    cvmfs_pull(cd, img.ref)
    top = repo.layerfs(img.layers[-1])
    top.rename(top.with_name("moved-away"))
    start = time.monotonic()
    res = cd.run(img.ref, "/bin/true", check=False)
    assert res.returncode != 0
    assert f"repository directory {top}" in res.stderr, res.stderr
    assert time.monotonic() - start < 60
