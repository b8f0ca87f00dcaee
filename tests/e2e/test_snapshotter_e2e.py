"""cvmfs-snapshotter under a real containerd 1.6, with images from a real registry:
pull + run through `ctr`, the tree a container sees, snapshot listing/removal,
namespaces, containerd's garbage collector, and restarts of both processes."""
from __future__ import annotations


import pytest

from tests.fixtures.containerd import Containerd
from tests.fixtures.images import BuiltImage
from tests.fixtures.polling import wait_until
from tests.fixtures.snapshotter import SnapshotterProcess
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing

pytestmark = pytest.mark.e2e


def assert_tree(cd: Containerd, img: BuiltImage, namespace: str = "default") -> None:
    out = cd.run(img.ref, *LISTING_COMMAND, namespace=namespace).stdout
    observed = parse_listing(out)
    assert "/bin/busybox" in observed.entries, out[-2000:]
    problems = compare_trees(img.tree, observed)
    assert problems == [], "container tree differs:\n" + "\n".join(problems)


def committed_names(cd: Containerd, namespace: str = "default") -> set[str]:
    return {s["key"] for s in cd.snapshots(namespace) if s["kind"] == "Committed"}


@pytest.mark.parametrize("which", ["multilayer", "multilayer_docker"])
def test_pull_and_run_shows_the_image_tree(containerd, standard_images, which):
    img = getattr(standard_images, which)
    containerd.pull(img.ref)
    assert_tree(containerd, img)
    out = containerd.run(img.ref, "/bin/sh", "-c",
                         "cat /links/rel /links/abs /opaque/new1 /opt/app/added.txt").stdout
    assert out == "keep\nkeep\nnew1\nadded\n"


def test_container_writes_go_to_its_own_snapshot(containerd, standard_images):
    img = standard_images.multilayer
    containerd.pull(img.ref)
    script = ("echo hi > /data/keep.txt && rm /hl/link1 && mkdir /opt/app/w && "
              "cat /data/keep.txt && ls /hl && stat -c '%a %u' /opt/app")
    out = containerd.run(img.ref, "/bin/sh", "-c", script).stdout
    assert out.splitlines() == ["hi", "base-file", "cross", "original", "750 1000"]
    # The committed layers are untouched: a new container sees the image again.
    assert_tree(containerd, img)


def test_snapshots_ls_prepare_and_rm(containerd, snapshotter, standard_images):
    img = standard_images.multilayer
    containerd.pull(img.ref)
    chain = img.chain_ids()
    assert set(chain) <= committed_names(containerd)
    parents = {s["key"]: s["parent"] for s in containerd.snapshots()}
    assert [parents[c] for c in chain] == ["", *chain[:-1]]  # the layer stack

    containerd.ctr("snapshots", "--snapshotter", "cvmfs-snapshotter", "prepare", "my-active", chain[-1])
    row = next(s for s in containerd.snapshots() if s["key"] == "my-active")
    assert row == {"key": "my-active", "parent": chain[-1], "kind": "Active"}
    mounts = containerd.ctr("snapshots", "--snapshotter", "cvmfs-snapshotter", "mounts",
                            "/mnt", "my-active").stdout
    assert "overlay" in mounts or "bind" in mounts, mounts

    # A committed snapshot with children cannot go.
    res = containerd.ctr("snapshots", "--snapshotter", "cvmfs-snapshotter", "rm", chain[-1],
                         check=False)
    assert res.returncode != 0
    containerd.ctr("snapshots", "--snapshotter", "cvmfs-snapshotter", "rm", "my-active")
    assert "my-active" not in {s["key"] for s in containerd.snapshots()}
    # containerd drops it from its metadata at once; the backend Remove comes from its
    # garbage collector, asynchronously (metadata/snapshot.go, Remove → db dirty → GC).
    def gone() -> bool:
        return not [s for s in snapshotter.list_snapshots() if s["name"].endswith("/my-active")]
    wait_until(gone, 15, "the backend's snapshot gone (containerd's GC)", interval=0.2,
               detail=snapshotter.list_snapshots)


def test_image_in_two_namespaces(containerd, snapshotter, standard_images):
    img = standard_images.multilayer
    for ns in ("default", "second"):
        containerd.pull(img.ref, namespace=ns)
        assert set(img.chain_ids()) <= committed_names(containerd, ns)
    # containerd's metadata keeps one backend snapshot per namespace and layer.
    committed = [s for s in snapshotter.list_snapshots() if s["kind"] == "Committed"]
    assert len(committed) >= 2 * len(img.layers)
    containerd.ctr("image", "rm", "--sync", img.ref, namespace="default")
    assert_tree(containerd, img, namespace="second")


def test_gc_removes_snapshots_of_a_removed_image(containerd, snapshotter, standard_images):
    img = standard_images.multilayer
    containerd.pull(img.ref)
    assert_tree(containerd, img)
    assert committed_names(containerd)
    containerd.ctr("image", "rm", "--sync", img.ref)
    # containerd's GC runs asynchronously after the image is gone
    wait_until(lambda: not containerd.snapshots(), 15, "containerd's snapshots gone", interval=0.2,
               detail=containerd.snapshots)
    wait_until(lambda: not snapshotter.list_snapshots(), 15, "the backend's snapshots gone", interval=0.2,
               detail=snapshotter.list_snapshots)


def test_images_sharing_layers(containerd, snapshotter, standard_images):
    """Tags of one repository share their bottom layers: shared chainIDs, one snapshot each."""
    t11, t20 = standard_images.tagged["1.1"], standard_images.tagged["2.0"]
    containerd.pull(t11.ref)
    containerd.pull(t20.ref)
    names = committed_names(containerd)
    assert set(t11.chain_ids()) | set(t20.chain_ids()) == names
    assert containerd.run(t20.ref, "cat", "/version").stdout == "2.0\n"
    out = containerd.run(t11.ref, "/bin/sh", "-c", "cat /version; test -e /etc/motd || echo gone").stdout
    assert out == "1.1\ngone\n"
    containerd.ctr("image", "rm", "--sync", t20.ref)
    wait_until(lambda: committed_names(containerd) == set(t11.chain_ids()), 15, "only 1.1's snapshots left",
               interval=0.2, detail=lambda: committed_names(containerd))


def test_multi_platform_index(containerd, standard_images):
    index = standard_images.multiarch
    native = next(i for i in index.images.values() if "/bin/busybox" in i.tree.entries)
    containerd.pull(index.ref)
    assert containerd.run(index.ref, "cat", "/platform").stdout == native.platform.architecture + "\n"
    assert set(native.chain_ids()) <= committed_names(containerd)


def test_restart_containerd_and_snapshotter(containerd, snapshotter: SnapshotterProcess,
                                            standard_images):
    img = standard_images.multilayer
    containerd.pull(img.ref)
    before = committed_names(containerd)

    containerd.stop()
    snapshotter.restart()
    containerd.start()
    containerd.wait_snapshotter_ready()
    assert committed_names(containerd) == before
    assert_tree(containerd, img)

    # The snapshotter alone goes away and comes back under a running containerd.
    snapshotter.kill9()
    snapshotter.start()
    containerd.wait_snapshotter_ready()
    assert committed_names(containerd) == before
    assert_tree(containerd, img)
