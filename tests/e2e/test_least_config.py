"""The least containerd config (the proxy plugin, CRI's snapshotter, no label settings) on
Debian 12's containerd 1.6: its unpacker names each layer only by chainID, so the repository
serves the layers whose chain it holds (`.chains`, as the publisher writes them) and the
bottom layer by diffID (`.diffids`; a bottom chainID is its diffID); the rest is pulled.
Proof: blob GETs in the registry's access log."""

from __future__ import annotations

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.e2e.repo_writer import publish_chains, publish_layers
from tests.e2e.pulls import cri_pull
from tests.fixtures.containerd import CriOptions
from tests.fixtures.images import push_zstd_multilayer
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing

pytestmark = pytest.mark.e2e

@pytest.fixture
def setup(registry_factory, push_standard_images, e2e_base, snapshotter_factory, containerd_factory):
    from tests.fixtures.workdirs import new_workdir

    reg = registry_factory()
    img = push_standard_images(reg).multilayer
    repo = RepositoryLayout(new_workdir("repo-", e2e_base))

    def start(*, annotations: bool = False):  # annotations: disable_snapshot_annotations = false
        sn = snapshotter_factory(repositories=[repo.root])
        cd = containerd_factory(sn.address, cri=CriOptions(plain_http_registries=[reg.host],
                                                           snapshot_annotations=annotations))
        reg.clear_log()
        return sn, cd

    return reg, img, repo, start


def check_tree(cd, image):
    out = cd.run(image.ref, *LISTING_COMMAND, namespace="k8s.io").stdout
    problems = compare_trees(image.tree, parse_listing(out))
    assert not problems, "\n".join(problems)


def test_cri_pull_with_least_config_serves_published_chains(setup):
    reg, img, repo, start = setup
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    publish_chains(img, repo)
    for digest in img.layers:
        reg.delete_blob_files(digest)
    sn, cd = start()
    assert cri_pull(cd.address, img.ref).startswith("sha256:")
    assert reg.blob_get_count() == 1  # the config only
    assert sn.log().count("served from") == len(img.layers), sn.log()
    check_tree(cd, img)


def test_cri_pull_with_least_config_zstd_copy_of_a_published_image(setup, tmp_path):
    """The same layers recompressed: found by chainID, no layer GET."""
    reg, img, repo, start = setup
    zimg = push_zstd_multilayer(reg.host, tmp_path)
    assert zimg.diff_ids == img.diff_ids and not set(zimg.layers) & set(img.layers)
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    publish_chains(img, repo)
    for digest in zimg.layers:
        reg.delete_blob_files(digest)
    sn, cd = start()
    assert cri_pull(cd.address, zimg.ref).startswith("sha256:")
    assert reg.blob_get_count() == 1
    check_tree(cd, zimg)


def test_cri_pull_with_least_config_layers_without_chains(setup):
    """containerd 1.6 sends no diffID: of layer dirs without their chains only the bottom one
    is found (its chainID is its diffID); the rest is pulled normally, in the same image."""
    reg, img, repo, start = setup
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    sn, cd = start()
    assert cri_pull(cd.address, img.ref).startswith("sha256:")
    gets = [reg.blob_get_count(d) for d in img.layers]
    print(f"layer blob GETs: {gets}")
    assert gets == [0] + [1] * (len(img.layers) - 1)
    assert sn.log().count("served from") == 1, sn.log()
    check_tree(cd, img)


def test_ctr_image_pull_on_1_6_fetches_and_unpacks_every_layer(setup):
    """Why the README sends 1.6 users to CRI or our pull: 1.6's ctr downloads the whole image,
    then unpacks it itself (rootfs.ApplyLayers: its Prepare carries no ref label at all)."""
    reg, img, repo, start = setup
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    publish_chains(img, repo)
    sn, cd = start()
    cd.pull(img.ref)
    gets = [reg.blob_get_count(d) for d in img.layers]
    print(f"layer blob GETs: {gets}")
    assert gets == [1] * len(img.layers)
    assert sn.log().count("served from") == 0, sn.log()
