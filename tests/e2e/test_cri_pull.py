"""Kubernetes path: a CRI PullImage through containerd's CRI plugin uses the repository."""

from __future__ import annotations

import pytest

from tests.e2e.pulls import cri_pull
from tests.e2e.repo_writer import publish_layers
from tests.fixtures.containerd import CriOptions
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing

pytestmark = pytest.mark.e2e


def test_cri_pull_uses_repository_layers(registry_factory, push_standard_images, e2e_base, snapshotter_factory,
                                         containerd_factory):
    from cvmfs_common.repo.paths import RepositoryLayout
    from tests.fixtures.workdirs import new_workdir

    reg = registry_factory()
    img = push_standard_images(reg).multilayer
    repo = RepositoryLayout(new_workdir("repo-", e2e_base))
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    for digest in img.layers:
        reg.delete_blob_files(digest)  # a download would fail
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address, cri=CriOptions(plain_http_registries=[reg.host]))
    reg.clear_log()
    ref = cri_pull(cd.address, img.ref)
    assert ref.startswith("sha256:")
    assert all(reg.blob_get_count(d) == 0 for d in img.layers)
    served = sn.log().count("served from")
    assert served == len(img.layers), sn.log()
    out = cd.run(img.ref, *LISTING_COMMAND, namespace="k8s.io").stdout
    problems = compare_trees(img.tree, parse_listing(out))
    assert not problems, "\n".join(problems)
