"""Robustness under load and faults, through the real stack."""

from __future__ import annotations

import collections
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from cvmfs_common.repo.paths import RepositoryLayout
from tests.e2e.repo_writer import publish_layers
from tests.e2e.pulls import SNAPSHOTTER_BIN, cvmfs_pull
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing
from tests.fixtures.workdirs import new_workdir
from tests.snapshotter.deep_tree import remove_everything

pytestmark = pytest.mark.e2e

ROUNDS = 1500  # of Commit racing Remove: the old INTERNAL came up ~3 times in 1 000


def backend_state(sn) -> tuple[set[str], set[str], set[str]]:
    """(keys in sqlite via List, snapshot dirs, l/ links) of our snapshotter."""
    with grpc.insecure_channel(f"unix:{sn.address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        keys = {i.name for r in stub.List(pb.ListSnapshotsRequest(), timeout=30) for i in r.info}
    return keys, set(os.listdir(sn.root / "snapshots")), set(os.listdir(sn.root / "l"))


def test_eight_concurrent_pulls_of_images_sharing_layers(registry_factory, push_standard_images, e2e_base,
                                                        snapshotter_factory, containerd_factory):
    reg = registry_factory()
    images = push_standard_images(reg)
    repo = RepositoryLayout(new_workdir("repo-", e2e_base))
    publish_layers(reg.host, images.multilayer, repo, [0])  # a shared base layer from the repository
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)
    refs = [images.multilayer.ref, images.multilayer_docker.ref, *[i.ref for i in images.tagged.values()]]
    jobs = [(refs[i % len(refs)], f"ns{i % 3}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: cvmfs_pull(cd, job[0], namespace=job[1]), jobs))
    assert all(r.returncode == 0 for r in results)
    for ref, ns in {(r, n) for r, n in jobs}:
        img = next(i for i in [images.multilayer, images.multilayer_docker, *images.tagged.values()] if i.ref == ref)
        out = cd.run(ref, *LISTING_COMMAND, namespace=ns).stdout
        assert not compare_trees(img.tree, parse_listing(out)), ref


def test_thousand_cycles_leak_nothing(snapshotter):
    with grpc.insecure_channel(f"unix:{snapshotter.address}") as ch:
        s = pb_grpc.SnapshotsStub(ch)
        s.Prepare(pb.PrepareSnapshotRequest(key="base-a"))
        s.Commit(pb.CommitSnapshotRequest(key="base-a", name="base"))
        for i in range(1000):
            s.Prepare(pb.PrepareSnapshotRequest(key=f"a{i}", parent="base"))
            s.Commit(pb.CommitSnapshotRequest(key=f"a{i}", name=f"c{i}"))
            s.View(pb.ViewSnapshotRequest(key=f"v{i}", parent=f"c{i}"))
            s.Remove(pb.RemoveSnapshotRequest(key=f"v{i}"))
            s.Remove(pb.RemoveSnapshotRequest(key=f"c{i}"))
    keys, dirs, links = backend_state(snapshotter)
    assert keys == {"base"}
    assert dirs == {"1"} and links == {"1"}


def test_kill9_during_pull_then_restart_and_rerun(registry, standard_images, snapshotter_factory,
                                                 containerd_factory):
    img = standard_images.multilayer_docker
    sn = snapshotter_factory(extra_args=["--log-level", "debug"])  # logs every RPC
    cd = containerd_factory(sn.address)
    pull = subprocess.Popen(
        [str(SNAPSHOTTER_BIN), "pull", "--containerd-address", str(cd.address), "--plain-http", img.ref],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill the snapshotter as soon as the pull has started preparing layers.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "Prepare" not in sn.log() and pull.poll() is None:
        time.sleep(0.01)
    sn.kill9()
    pull.wait(120)
    sn.start()
    cd.wait_snapshotter_ready()
    cvmfs_pull(cd, img.ref)
    out = cd.run(img.ref, *LISTING_COMMAND).stdout
    assert not compare_trees(img.tree, parse_listing(out))
    # containerd's GC after removing the image, then Cleanup: no orphans left.
    cd.ctr("image", "rm", "--sync", img.ref)
    with grpc.insecure_channel(f"unix:{sn.address}") as ch:
        pb_grpc.SnapshotsStub(ch).Cleanup(pb.CleanupRequest(), timeout=60)
    keys, dirs, links = backend_state(sn)
    assert keys == set(), keys
    assert dirs == set() and links == set(), (dirs, links)


def test_containerd_restart_under_running_snapshotter(registry, standard_images, snapshotter_factory,
                                                      containerd_factory):
    img = standard_images.multilayer
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    cvmfs_pull(cd, img.ref)
    for _ in range(2):
        cd.restart()
        cd.wait_snapshotter_ready()
        out = cd.run(img.ref, *LISTING_COMMAND).stdout
        assert not compare_trees(img.tree, parse_listing(out))
    assert sn.running


DEEP = 5000  # levels; 1 500 already broke the recursive rmtree


def test_container_with_a_5000_level_tree_is_removed_and_cleaned_up(registry, standard_images,
                                                                     snapshotter_factory, containerd_factory):
    """A container builds a 5000-level tree in its upper dir; containerd removes the
    container and (GC) its snapshot, then our Cleanup: every step succeeds, nothing is left."""
    img = standard_images.multilayer
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    cd.pull(img.ref)
    # Built bottom-up by moving the chain one level down each time: paths stay short
    # (a shell's `cd` down the chain needs getcwd and PATH_MAX-long names).
    script = (f"mkdir d; i=1; while [ $i -lt {DEEP} ]; do mkdir n && mv d n/ && mv n d || exit 1; i=$((i+1)); done;"
              " echo depth $i")
    try:
        out = cd.run(img.ref, "/bin/sh", "-c", script, container_id="deep").stdout
        assert f"depth {DEEP}" in out
        # The container is gone; GC (synchronous with --sync) removes every snapshot from
        # our backend through Remove, then calls Cleanup.
        cd.ctr("image", "rm", "--sync", img.ref)
        keys, dirs, links = backend_state(sn)
        assert keys == set(), f"Remove did not remove {keys}"
        with grpc.insecure_channel(f"unix:{sn.address}") as ch:
            pb_grpc.SnapshotsStub(ch).Cleanup(pb.CleanupRequest(), timeout=300)
        keys, dirs, links = backend_state(sn)
        assert dirs == set() and links == set(), (dirs, links)
        assert "Traceback" not in sn.log(), sn.log()[-3000:]
    finally:
        # Leave nothing that the fixtures' (recursive) clean-up cannot remove.
        for entry in os.scandir(sn.root / "snapshots"):
            try:
                remove_everything(entry.path)
            except FileNotFoundError:  # removed meanwhile by containerd's GC
                pass


def test_commit_racing_remove_on_one_key_is_not_found_never_internal(snapshotter):
    """containerd's unpacker may Remove an extract snapshot while a Commit of it runs (a
    cancelled pull). Whichever wins, the other gets NOT_FOUND: never INTERNAL with a
    traceback (Commit measuring a directory that Remove has just renamed away: a window of
    microseconds, hit a few times in a thousand rounds)."""
    import threading

    codes: dict[str, list[str]] = {"Commit": [], "Remove": []}
    with grpc.insecure_channel(f"unix:{snapshotter.address}") as ch:
        s = pb_grpc.SnapshotsStub(ch)
        for i in range(ROUNDS):
            key = f"extract-{i}"
            (mount,) = s.Prepare(pb.PrepareSnapshotRequest(key=key), timeout=30).mounts
            open(f"{mount.source}/f", "w").close()
            barrier = threading.Barrier(2)

            def call(name: str, fn) -> None:
                barrier.wait()
                try:
                    fn()
                    codes[name].append("OK")
                except grpc.RpcError as e:
                    codes[name].append(e.code().name)

            threads = [threading.Thread(target=call, args=("Commit", lambda: s.Commit(
                           pb.CommitSnapshotRequest(key=key, name=f"committed-{i}"), timeout=60))),
                       threading.Thread(target=call, args=("Remove", lambda: s.Remove(
                           pb.RemoveSnapshotRequest(key=key), timeout=60)))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if codes["Commit"][-1] == "OK":
                s.Remove(pb.RemoveSnapshotRequest(key=f"committed-{i}"), timeout=60)
    outcomes = collections.Counter(zip(codes["Commit"], codes["Remove"]))
    assert set(outcomes) <= {("OK", "NOT_FOUND"), ("NOT_FOUND", "OK")}, outcomes
    assert "Traceback" not in snapshotter.log()
    keys, dirs, links = backend_state(snapshotter)
    assert keys == set() and dirs == set() and links == set()
