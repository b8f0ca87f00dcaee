"""Our OCI chainIDs against containerd's own: pull a test image with ctr and compare
the chain ID it prints and the snapshot names it commits."""
from __future__ import annotations

import os
import re

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.registry.client import RegistryClient
from tests.fixtures._proc import require_binaries
from tests.fixtures.containerd import CONTAINERD_BIN, CTR_BIN, Containerd
from tests.fixtures.workdirs import new_workdir, remove_workdir


@pytest.fixture
def plain_containerd(e2e_base):
    """containerd with its own root/state/socket; the proxy plugin points nowhere
    (this test only uses the built-in `native` snapshotter)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run containerd")
    missing = require_binaries(CONTAINERD_BIN, CTR_BIN)
    if missing:
        pytest.skip("missing binaries: " + ", ".join(missing))
    work = new_workdir("cd-", e2e_base)
    cd = Containerd(work, work / "no-snapshotter.sock").start()
    yield cd
    cd.stop()
    remove_workdir(work)


def test_chain_ids_match_containerd(registry, standard_images, plain_containerd):
    img = standard_images.multilayer
    with RegistryClient() as c:
        _, config = c.fetch_config(c.resolve(img.ref))
    ours = chain_ids(config["rootfs"]["diff_ids"])
    assert len(ours) == 3
    out = plain_containerd.ctr("image", "pull", "--plain-http", "--print-chainid",
                               "--snapshotter", "native", img.ref).stdout
    m = re.search(r"image chain ID: (sha256:[0-9a-f]{64})", out)
    assert m, out[-2000:]
    assert m.group(1) == ours[-1]
    # every committed snapshot is named by its chainID
    committed = {row["key"] for row in plain_containerd.snapshots(snapshotter="native")
                 if row["kind"] == "Committed"}
    assert committed == set(ours)
