"""Remote-layer decisions (docs/DESIGN.md#whiteouts) on a repository written with the layout module."""

import logging
import threading
import time
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import ducc_chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from snapshotter.core import Snapshotter, remote_snapshot_name
from snapshotter.errors import AlreadyExists, Unavailable
from snapshotter.labels import CVMFS_LAYER_DIGEST_LABEL, DIFF_ID_LABEL, SNAPSHOT_REF_LABEL
from snapshotter.source.remote import build_remote_layers
from snapshotter.source.repository import RepositoryUnavailable


from .published import BLOBS, CHAINS, DIFFS, d, publish_chain, publish_layer


@pytest.fixture
def repo(tmp_path):
    return RepositoryLayout(tmp_path / "repo")


@pytest.fixture
def make_sn(tmp_path):
    made = []

    def make(*roots, timeout=2.0):
        s = Snapshotter(tmp_path / f"root{len(made)}", build_remote_layers([str(r) for r in roots], timeout, 5.0))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def prepare_layer(sn: Snapshotter, i: int, parent: str, labels: dict | None = None) -> bool:
    """Like containerd's unpacker; True when served remotely (ALREADY_EXISTS)."""
    labels = labels if labels is not None else {SNAPSHOT_REF_LABEL: CHAINS[i], CVMFS_LAYER_DIGEST_LABEL: BLOBS[i]}
    key = f"ns/{i}/extract-x {CHAINS[i]}"
    try:
        sn.prepare(key, parent, labels)
    except AlreadyExists:
        return True
    sn.commit(f"ns/{i}/{CHAINS[i]}", key, {})
    return False


def remote_name(sn, i, parent):
    found = sn.walk([f'labels."{SNAPSHOT_REF_LABEL}"=={CHAINS[i]},parent=="{parent}"'])
    assert len(found) == 1
    return found[0].name


def test_layers_served_and_stacked(repo, make_sn):
    dirs = [publish_layer(repo, i) for i in range(3)]
    sn = make_sn(repo.root)
    parent = ""
    for i in range(3):
        assert prepare_layer(sn, i, parent)
        name = remote_name(sn, i, parent)
        assert name == remote_snapshot_name(CHAINS[i], parent)
        assert sn.stat(name).parent == parent
        parent = name
    (m,) = sn.prepare("container", parent, {})
    lowers = next(o for o in m.options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")
    assert [str(Path(p).resolve()) for p in lowers] == [str(x) for x in reversed(dirs)]


def test_raw_whiteouts_use_the_chain_as_whole_stack(repo, make_sn):
    publish_layer(repo, 0)
    publish_layer(repo, 1, whiteouts="raw")
    chain_dir = publish_chain(repo, CHAINS[1])
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "")
    p0 = remote_name(sn, 0, "")
    assert prepare_layer(sn, 1, p0)
    p1 = remote_name(sn, 1, p0)
    (m,) = sn.view("v", p1, {})
    assert m.type == "bind" and Path(m.source) == chain_dir  # the chain alone, not layer 0 below it


def test_ducc_written_repository_uses_ducc_chain_ids(repo, make_sn):
    # DUCC: no whiteouts field (unknown) and .chains named by its own ids.
    for i in range(2):
        fs = repo.layerfs(BLOBS[i])
        fs.mkdir(parents=True)
    ducc = ducc_chain_ids(BLOBS[:2])
    publish_chain(repo, ducc[0])
    publish_chain(repo, ducc[1])
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "")
    p0 = remote_name(sn, 0, "")
    assert prepare_layer(sn, 1, p0)
    p1 = remote_name(sn, 1, p0)
    (m,) = sn.view("v", p1, {})
    assert Path(m.source) == repo.chain_dir(ducc[1])


def test_parent_chain_mismatch_falls_back(repo, make_sn):
    publish_layer(repo, 0)
    publish_layer(repo, 1, parent_chain=d("some other chain"))
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "")
    p0 = remote_name(sn, 0, "")
    assert not prepare_layer(sn, 1, p0)  # normal unpack path


def test_parent_chain_match_is_served(repo, make_sn):
    publish_layer(repo, 0)
    publish_layer(repo, 1, parent_chain=CHAINS[0])
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "")
    assert prepare_layer(sn, 1, remote_name(sn, 0, ""))


def test_mixed_local_and_remote_layers(repo, make_sn):
    publish_layer(repo, 1)  # only the middle layer is published
    sn = make_sn(repo.root)
    assert not prepare_layer(sn, 0, "")
    assert prepare_layer(sn, 1, f"ns/0/{CHAINS[0]}")
    p1 = remote_name(sn, 1, f"ns/0/{CHAINS[0]}")
    assert not prepare_layer(sn, 2, p1)


def test_repositories_tried_in_order(tmp_path, make_sn):
    first, second = RepositoryLayout(tmp_path / "a"), RepositoryLayout(tmp_path / "b")
    publish_layer(second, 0)
    sn = make_sn(first.root, second.root)
    assert prepare_layer(sn, 0, "")
    info = sn.stat(remote_name(sn, 0, ""))
    assert info.labels["containerd.io/snapshot/cvmfs.source"].startswith(str(second.root))


def test_same_layer_twice_reuses_the_remote_snapshot(repo, make_sn):
    publish_layer(repo, 0)
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "")
    assert prepare_layer(sn, 0, "")
    assert len(sn.walk([f'labels."{SNAPSHOT_REF_LABEL}"=={CHAINS[0]}'])) == 1


def test_vanished_repository_dir_fails_mounts_clearly(repo, make_sn):
    fs = publish_layer(repo, 0)
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "")
    sn.prepare("c", remote_name(sn, 0, ""), {})
    fs.rename(fs.with_name("gone"))
    sn.remote.repositories[0]._cache.clear()
    with pytest.raises(Unavailable, match="gone"):
        sn.mounts("c")


def test_hung_repository_falls_back_within_timeout(repo, make_sn, monkeypatch, caplog):
    publish_layer(repo, 0)
    timeout, margin = 0.3, 10.0  # generous margin (a shared machine), still far below the 60 s hang
    sn = make_sn(repo.root, timeout=timeout)
    release = threading.Event()
    import snapshotter.source.repository as repository_mod

    monkeypatch.setattr(repository_mod, "find_layer", lambda layout, digest: release.wait(60))
    caplog.set_level(logging.WARNING, logger="snapshotter")
    try:
        start = time.monotonic()
        assert not prepare_layer(sn, 0, "")  # fell back to the normal path
        elapsed = time.monotonic() - start
        assert timeout * 0.9 <= elapsed < timeout + margin, elapsed  # waited for the lookup, not for the hang
        assert f"did not answer layer {BLOBS[0]} within 0.3s" in caplog.text
        repo = sn.remote.repositories[0]
        assert not repo.healthy
        # The same question fails fast while it is stuck; others get a fresh prober thread
        # each, until MAX_STUCK of them are stuck (the whole mount hangs): then all fail fast.
        with pytest.raises(RepositoryUnavailable, match=f"layer {BLOBS[0]} is still stuck"):  # the fast path's words
            repo.layer(BLOBS[0])
        for blob in [d(f"other{i}") for i in range(repository_mod.MAX_STUCK - 1)]:
            with pytest.raises(RepositoryUnavailable, match="did not answer"):
                repo.layer(blob)
        caplog.clear()
        start = time.monotonic()
        assert not prepare_layer(sn, 1, f"ns/0/{CHAINS[0]}")  # fails fast while stuck
        assert time.monotonic() - start < timeout + margin
        assert f"is not answering ({repository_mod.MAX_STUCK} lookups are still stuck)" in caplog.text
    finally:
        release.set()


def minimal(i: int, with_diff_id: bool = True) -> dict:
    """What containerd's unpacker sends with no CRI labels: the chainID, and (2.3+) the diffID."""
    return {SNAPSHOT_REF_LABEL: CHAINS[i], **({DIFF_ID_LABEL: DIFFS[i]} if with_diff_id else {})}


def lowers_of(sn: Snapshotter, parent: str) -> list[str]:
    (m,) = sn.prepare(f"c-{parent}", parent, {})
    if m.type == "bind":
        return [str(Path(m.source).resolve())]
    return [str(Path(p).resolve()) for p in
            next(o for o in m.options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")]


def test_layers_found_by_diff_id_without_digest_labels(repo, make_sn):
    """containerd 2.3's unpacker with no CRI labels: every layer dir served, stacked per layer."""
    dirs = [publish_layer(repo, i) for i in range(3)]
    sn = make_sn(repo.root)
    parent = ""
    for i in range(3):
        assert prepare_layer(sn, i, parent, minimal(i))
        parent = remote_name(sn, i, parent)
    assert lowers_of(sn, parent) == [str(x) for x in reversed(dirs)]


def test_recompressed_layer_served_by_diff_id(repo, make_sn):
    """The same layer pushed again with another compression: another blob digest, the same diffID."""
    publish_layer(repo, 0)
    zstd_blob = d("blob0 as zstd")
    sn = make_sn(repo.root)
    labels = {**minimal(0), CVMFS_LAYER_DIGEST_LABEL: zstd_blob}  # the blob is unknown, the diffID is not
    assert prepare_layer(sn, 0, "", labels)
    assert lowers_of(sn, remote_name(sn, 0, "")) == [str(repo.layerfs(BLOBS[0]))]


def test_chain_id_alone_finds_the_bottom_layer_and_published_chains(repo, make_sn):
    """containerd before 2.3 with no CRI labels sends only the chainID: the bottom layer's is its
    diffID; above it the chain dir the publisher wrote serves."""
    publish_layer(repo, 0)
    publish_layer(repo, 1)
    chain_dir = publish_chain(repo, CHAINS[1])
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "", minimal(0, with_diff_id=False))
    p0 = remote_name(sn, 0, "")
    assert lowers_of(sn, p0) == [str(repo.layerfs(BLOBS[0]))]
    assert prepare_layer(sn, 1, p0, minimal(1, with_diff_id=False))
    assert lowers_of(sn, remote_name(sn, 1, p0)) == [str(chain_dir)]
    assert not prepare_layer(sn, 2, remote_name(sn, 1, p0), minimal(2, with_diff_id=False))


def test_diff_id_link_to_another_layer_is_not_followed(repo, make_sn):
    publish_layer(repo, 0)
    publish_layer(repo, 1)
    link = repo.diffid_link(DIFFS[1])
    link.unlink()
    link.symlink_to(repo.diffid_link_target(BLOBS[0]))  # names a layer whose diffID is another
    sn = make_sn(repo.root)
    assert prepare_layer(sn, 0, "", minimal(0))
    assert not prepare_layer(sn, 1, remote_name(sn, 0, ""), minimal(1))


def test_no_labels_no_lookup(repo, make_sn, monkeypatch):
    """A Prepare that is no unpack (a container's root) asks no repository anything."""
    publish_layer(repo, 0)
    sn = make_sn(repo.root)
    import snapshotter.source.repository as repository_mod

    def fail(*a):
        raise AssertionError("looked up")

    for name in ("find_layer", "find_layer_by_diff_id", "find_chain"):
        monkeypatch.setattr(repository_mod, name, fail)
    sn.prepare("container", "", {})
