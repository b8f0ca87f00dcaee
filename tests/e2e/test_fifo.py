"""Named pipes survive the whole path, as they do through containerd's own pull, podman's
and umoci: layer dirs (as an overlay stack), chains, .flat, `ctr run` through the
snapshotter, and `podman run` from podmanStore."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from tests.publisher.treeview import diff_trees, tree_snapshot
from tests.e2e.pulls import cvmfs_pull
from tests.fixtures.tree import LISTING_COMMAND, RUNTIME_MOUNTS, compare_trees, parse_listing
from tests.fixtures.workdirs import new_workdir
from tests.publisher.clirun import run_cli
from tests.publisher.podmanenv import Podman, podman_missing
from tests.publisher.repotree import flat_minus_chain, overlay_mount

pytestmark = pytest.mark.e2e

PODMAN_MOUNTS = RUNTIME_MOUNTS | {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab"}
FIFOS = ("/var/run/pipe", "/var/run/pipe-link", "/srv/queue")


@pytest.fixture(scope="module")
def published(standard_images, e2e_base):
    if os.geteuid() != 0:
        pytest.skip("needs root (mknod of FIFOs with their owners, overlay mounts)")
    work = new_workdir("fifo-", e2e_base)
    root = work / "repo"
    res = run_cli("convert-image", standard_images.fifo.ref, "--repository-root", root, "--state-db",
                  work / "state.db")
    assert res.rc == 0, res.stdout
    return RepositoryLayout(root), work


def test_fifos_in_layers_chain_and_flat_equal_umoci(standard_images, published) -> None:
    lay, work = published
    img = standard_images.fifo
    assert any(e.type == "fifo" for e in img.tree.entries.values())  # the fixture has them
    top = lay.chain_dir(chain_ids(img.diff_ids)[-1])
    flat = lay.flat_dir(img.config_digest)
    for root in (top, flat):
        for p in FIFOS:
            assert stat.S_ISFIFO(os.lstat(root / p.lstrip("/")).st_mode), (root, p)
        assert (root / "var/run/becomes-file").read_text() == "now a file\n"
    st = os.lstat(flat / "srv/queue")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1000, 1000)
    assert os.lstat(flat / "var/run/pipe").st_ino == os.lstat(flat / "var/run/pipe-link").st_ino
    assert flat_minus_chain(flat, top) == []
    # the layer dirs stacked by kernel overlay, as the snapshotter serves them
    with overlay_mount([lay.layerfs(d) for d in reversed(img.layers)]) as mnt:
        stacked = tree_snapshot(mnt)
    assert diff_trees(tree_snapshot(top), stacked) == []
    # umoci unpack of the same image: the reference
    bundle = work / "umoci-fifo"
    subprocess.run(["umoci", "unpack", "--image", f"{standard_images.layout}:fifo", str(bundle)], check=True,
                   capture_output=True)
    assert diff_trees(tree_snapshot(bundle / "rootfs"), tree_snapshot(top), ignore=("mtime_ns",)) == []


def test_ctr_run_through_the_snapshotter_shows_the_fifos(standard_images, published, registry,
                                                         snapshotter_factory, containerd_factory) -> None:
    lay, _ = published
    img = standard_images.fifo
    sn = snapshotter_factory(repositories=[lay.root])
    cd = containerd_factory(sn.address)
    registry.clear_log()
    cvmfs_pull(cd, img.ref)
    assert [registry.blob_get_count(digest=d) for d in img.layers] == [0] * len(img.layers)
    observed = parse_listing(cd.run(img.ref, *LISTING_COMMAND).stdout)
    assert all(observed.entries[p].type == "fifo" for p in FIFOS)
    assert compare_trees(img.tree, observed) == []


def test_podman_run_from_the_store_shows_the_fifos(standard_images, published) -> None:
    why = podman_missing()
    if why:
        pytest.skip(why)
    lay, work = published
    img = standard_images.fifo
    podman = Podman(work / "podman", stores=[lay.podman_store])
    observed = parse_listing(podman.run(img.ref, *LISTING_COMMAND).stdout)
    assert all(observed.entries[p].type == "fifo" for p in FIFOS)
    assert compare_trees(img.tree, observed, ignore=PODMAN_MOUNTS) == []
