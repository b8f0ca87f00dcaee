"""Cleanup racing the creating and removing RPCs, through the real serve process.

containerd 1.6 calls Cleanup after releasing its GC lock (metadata/snapshot.go), so
Prepares, Commits and Removes arrive while a Cleanup runs. A Cleanup must never remove a
directory whose snapshot exists, and none of the RPCs may fail because of it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.fixtures.snapshotter import SnapshotterProcess

PREPARES = 1500
WORKERS = 8


@pytest.fixture
def proc(tmp_path):
    p = SnapshotterProcess(tmp_path / "sn").start()
    yield p
    p.stop()


def _option(m, name: str) -> str:
    return next(o.split("=", 1)[1] for o in m.options if o.startswith(name + "="))


def _upper(mounts) -> str:
    (m,) = mounts
    return m.source if m.type == "bind" else _option(m, "upperdir")


def _top_lower(mounts) -> str:
    """The dir a view shows on top: its single lower (bind) or the first lowerdir link."""
    (m,) = mounts
    return m.source if m.type == "bind" else _option(m, "lowerdir").split(":")[0]


def test_prepare_commit_remove_storm_under_repeated_cleanups(proc):
    errors: list[str] = []
    stop = threading.Event()
    cleanups = 0

    with grpc.insecure_channel(f"unix:{proc.address}") as ch:
        s = pb_grpc.SnapshotsStub(ch)
        s.Prepare(pb.PrepareSnapshotRequest(key="base-a"), timeout=60)
        s.Commit(pb.CommitSnapshotRequest(key="base-a", name="base"), timeout=60)

        def cleanup_loop() -> None:
            nonlocal cleanups
            while not stop.is_set():
                try:
                    s.Cleanup(pb.CleanupRequest(), timeout=60)
                    cleanups += 1
                except grpc.RpcError as e:
                    errors.append(f"Cleanup: {e.code().name} {e.details()}")

        def one(i: int) -> tuple[str, str] | None:
            key = f"k{i}"
            try:
                mounts = s.Prepare(pb.PrepareSnapshotRequest(key=key, parent="base" if i % 2 else ""),
                                   timeout=60).mounts
                if i % 5 == 0:  # commit some (creates l/<id>), remove others: every kind of write
                    s.Commit(pb.CommitSnapshotRequest(key=key, name=f"c{i}"), timeout=60)
                    return None
                if i % 5 == 1:
                    s.Remove(pb.RemoveSnapshotRequest(key=key), timeout=60)
                    return None
                return key, _upper(mounts)
            except grpc.RpcError as e:
                errors.append(f"{key}: {e.code().name} {e.details()}")
                return None

        cleaner = threading.Thread(target=cleanup_loop)
        cleaner.start()
        try:
            with ThreadPoolExecutor(WORKERS) as pool:
                prepared = [r for r in pool.map(one, range(PREPARES)) if r is not None]
        finally:
            stop.set()
            cleaner.join()
        s.Cleanup(pb.CleanupRequest(), timeout=60)

        lost = [key for key, upper in prepared if not os.path.isdir(upper)]
        # A committed snapshot's content is what a View of it shows (a bind of its dir).
        committed_lost = []
        for i in range(0, PREPARES, 5):
            try:
                view = s.View(pb.ViewSnapshotRequest(key=f"v{i}", parent=f"c{i}"), timeout=60)
                if not os.path.isdir(_top_lower(view.mounts)):
                    committed_lost.append(f"c{i}")
            except grpc.RpcError as e:
                committed_lost.append(f"c{i}: {e.code().name}")
        print(f"{cleanups} cleanups, {len(errors)} failed RPCs, {len(lost)} of {len(prepared)} active and "
              f"{len(committed_lost)} of {PREPARES // 5} committed snapshots lost their directory")
        assert cleanups > 0
        assert not errors, errors[:10]
        assert not lost, f"{len(lost)} of {len(prepared)} prepared snapshots lost their directory: {lost[:10]}"
        assert not committed_lost, f"{len(committed_lost)} committed snapshots lost their directory"
        # And what is left is exactly what the store knows: nothing more, nothing less.
        keys = {i.name for r in s.List(pb.ListSnapshotsRequest(), timeout=60) for i in r.info}
    expected = {"base"} | {f"{c}{i}" for i in range(0, PREPARES, 5) for c in "cv"} | {k for k, _ in prepared}
    assert keys == expected
    assert len(os.listdir(proc.root / "snapshots")) == len(expected)
