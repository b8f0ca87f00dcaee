"""The repository as a layer source on its own (snapshotter/source/): lookups of layer dirs and
chains under a temporary repository, the answer cache, and a hung repository giving the right
domain error within the configured timeout."""

import os
import threading
import time

import pytest

import snapshotter.source.repository as repository_mod
from cvmfs_common.repo import lookup as layout_mod
from cvmfs_common.repo.paths import RepositoryLayout
from snapshotter.core import Snapshotter
from snapshotter.errors import AlreadyExists, Unavailable
from snapshotter.labels import CVMFS_LAYER_DIGEST_LABEL, SNAPSHOT_REF_LABEL
from snapshotter.layer_source import LayerMatch, LayerRequest, SourceUnavailable
from snapshotter.lineage import DuccIds
from snapshotter.source.remote import RemoteLayers, build_remote_layers
from snapshotter.source.repository import BoundedRepository, RepositoryUnavailable
from tests.fixtures.marks import requires_root

from .published import BLOBS, CHAINS, DIFFS, d, publish_chain, publish_layer

TIMEOUT = 0.5
MARGIN = 10.0  # generous: the machine is shared; the hang itself lasts 60 s


@pytest.fixture
def layout(tmp_path):
    return RepositoryLayout(tmp_path / "repo")


@pytest.fixture
def bounded(layout):
    repos = []

    def make(root=None, **kw):
        r = BoundedRepository(root or layout.root, **kw)
        repos.append(r)
        return r

    yield make
    for r in repos:
        r.close()


@pytest.fixture
def hang(monkeypatch):
    """Make every layer and chain lookup block (as a stat on a hung FUSE mount does) until released."""
    release = threading.Event()

    def blocking(real):
        return lambda layout, key: real(layout, key) if release.wait(60) else None

    monkeypatch.setattr(repository_mod, "find_layer", blocking(layout_mod.find_layer))
    monkeypatch.setattr(repository_mod, "find_chain", blocking(layout_mod.find_chain))
    yield release
    release.set()


# -- lookups -----------------------------------------------------------------------------------

def test_layer_lookup_reads_layers_json(layout, bounded):
    fs = publish_layer(layout, 0, whiteouts="raw", parent_chain=CHAINS[1])
    repo = bounded()
    found = repo.layer(BLOBS[0])
    assert found.layerfs == fs
    meta = found.metadata
    assert (meta.diff_digest, meta.whiteouts, meta.parent_chain) == (DIFFS[0], "raw", CHAINS[1])
    assert repo.layer(BLOBS[1]) is None
    layout.layerfs(BLOBS[2]).mkdir(parents=True)  # a layer dir without layers.json (e.g. half published)
    found = repo.layer(BLOBS[2])
    assert found.metadata is None and found.metadata_error


def test_chain_lookup(layout, bounded):
    path = publish_chain(layout, CHAINS[1])
    repo = bounded()
    assert repo.chain(CHAINS[1]) == path
    assert repo.chain(CHAINS[0]) is None


def test_find_returns_the_layer_dir_or_the_chain(layout):
    fs = publish_layer(layout, 0)
    chain = publish_chain(layout, CHAINS[1])
    source = build_remote_layers([str(layout.root)], TIMEOUT, 5.0)
    try:
        assert source.find(LayerRequest(CHAINS[0], BLOBS[0], False, None, None)) == LayerMatch(
            str(fs), False, layout.root)
        # layer 1 is not published as a layer dir: its chain is the whole stack
        assert source.find(LayerRequest(CHAINS[1], BLOBS[1], True, CHAINS[0], None)) == LayerMatch(
            str(chain), True, layout.root)
        # a DUCC id finds a chain published under it
        ducc = DuccIds(d("ducc1"), d("ducc2"))
        by_ducc = publish_chain(layout, ducc.ducc2)
        assert source.find(LayerRequest(CHAINS[2], None, True, CHAINS[1], ducc)) == LayerMatch(
            str(by_ducc), True, layout.root)
        assert source.find(LayerRequest(CHAINS[2], None, True, CHAINS[1], None)) is None
        assert source.find(LayerRequest("sha256:../../etc", None, False, None, None)) is None  # malformed
    finally:
        source.close()


@requires_root  # chowns the served dirs
def test_root_attributes_of_served_dirs_only(layout, tmp_path):
    fs = publish_layer(layout, 0)
    os.chmod(fs, 0o751)
    os.chown(fs, 4321, 8765)
    source = build_remote_layers([str(layout.root)], TIMEOUT, 5.0)
    try:
        mode, uid, gid = source.root_attributes(str(fs))
        assert (mode & 0o7777, uid, gid) == (0o751, 4321, 8765)
        assert source.root_attributes(str(tmp_path / "elsewhere")) is None  # not the source's own
    finally:
        source.close()


def test_answers_are_cached_for_the_ttl(layout, bounded):
    fs = publish_layer(layout, 0)
    now = [100.0]
    repo = bounded(cache_ttl=5.0, clock=lambda: now[0])
    assert repo.is_dir(str(fs))
    fs.rename(fs.with_name("gone"))
    now[0] += 4.9
    assert repo.is_dir(str(fs))  # still the cached answer
    now[0] += 0.2
    assert not repo.is_dir(str(fs))


# -- a hung repository -------------------------------------------------------------------------

def test_a_hung_lookup_raises_within_the_timeout_and_the_prober_recovers(layout, bounded, hang):
    failures = []
    repo = bounded(timeout=TIMEOUT, on_failure=failures.append)
    start = time.monotonic()
    with pytest.raises(RepositoryUnavailable, match=f"did not answer layer {BLOBS[0]} within 0.5s"):
        repo.layer(BLOBS[0])
    elapsed = time.monotonic() - start
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN, elapsed
    assert not repo.healthy
    with pytest.raises(SourceUnavailable, match="still stuck"):  # the domain error the core knows
        repo.layer(BLOBS[0])  # the same question: at once (the fast path's words)
    # Another question gets a fresh prober thread: it answers when it does not hang itself...
    assert repo.is_dir(str(layout.root)) is False
    # ... and waits its own timeout when it does, until MAX_STUCK questions are stuck.
    for chain in CHAINS[:repository_mod.MAX_STUCK - 1]:
        with pytest.raises(RepositoryUnavailable, match="did not answer"):
            repo.chain(chain)
    with pytest.raises(SourceUnavailable, match=f"{repository_mod.MAX_STUCK} lookups are still stuck"):
        repo.is_dir(str(layout.root / "x"))
    assert failures == [str(layout.root)] * (repository_mod.MAX_STUCK + 2)
    hang.set()
    deadline = time.monotonic() + MARGIN
    while not repo.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert repo.healthy
    assert repo.is_dir(str(layout.root)) is False  # answers again (the repository dir was never made)


def test_find_skips_a_hung_repository_for_the_next_one(tmp_path, hang, monkeypatch):
    first, second = RepositoryLayout(tmp_path / "a"), RepositoryLayout(tmp_path / "b")
    fs = publish_layer(second, 0)
    hanging = repository_mod.find_layer
    # only the first repository hangs
    monkeypatch.setattr(repository_mod, "find_layer", lambda lay, digest: hanging(lay, digest) if lay.root == first.root
                        else layout_mod.find_layer(lay, digest))
    source = RemoteLayers([BoundedRepository(first.root, TIMEOUT), BoundedRepository(second.root, TIMEOUT)])
    try:
        start = time.monotonic()
        assert source.find(LayerRequest(CHAINS[0], BLOBS[0], False, None, None)) == LayerMatch(
            str(fs), False, second.root)
        assert time.monotonic() - start < TIMEOUT + MARGIN
    finally:
        source.close()


def test_the_core_reports_a_hung_repository_as_unavailable(layout, tmp_path, hang):
    publish_layer(layout, 0)
    sn = Snapshotter(tmp_path / "root", build_remote_layers([str(layout.root)], TIMEOUT, 0.0))  # no cache
    try:
        hang.set()  # lookups answer while layer 0 is served
        labels = {SNAPSHOT_REF_LABEL: CHAINS[0], CVMFS_LAYER_DIGEST_LABEL: BLOBS[0]}
        with pytest.raises(AlreadyExists):
            sn.prepare("extract", "", labels)
        (parent,) = sn.walk([f'labels."{SNAPSHOT_REF_LABEL}"=={CHAINS[0]}'])
        sn.prepare("container", parent.name, {})
        hang.clear()  # now the repository hangs
        repo = sn.remote.repositories[0]
        for chain in [*CHAINS[2:], *(d(f"x{i}") for i in range(repository_mod.MAX_STUCK))][:repository_mod.MAX_STUCK]:
            with pytest.raises(RepositoryUnavailable):
                repo.chain(chain)  # the whole mount hangs: MAX_STUCK questions stuck
        start = time.monotonic()
        with pytest.raises(Unavailable, match="is not available: .* not answering"):
            sn.prepare("another", parent.name, {})  # the stat of the parent's "/" is stuck behind it
        with pytest.raises(Unavailable, match="snapshot 'container': .* not answering"):
            sn.mounts("container")
        assert time.monotonic() - start < TIMEOUT + MARGIN
    finally:
        hang.set()
        sn.close()


def _write_tag(lay: RepositoryLayout, files: dict[str, bytes]) -> None:
    meta = lay.manifest_json("reg.example", "team/app", "v1").parent
    meta.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (meta / name).write_bytes(data)


def test_published_reads_the_platform_dir_then_the_default_one(layout, bounded):
    from cvmfs_common.oci.platform import Platform

    arm = Platform("linux", "arm64")
    _write_tag(layout, {"manifest.json": b"M", "config.json": b"C", "index.json": b"I"})
    _write_tag(layout.for_platform("linux", "arm64"), {"manifest.json": b"m", "config.json": b"c"})
    repo = bounded()
    got = repo.published("reg.example", "team/app", "v1", arm)
    assert [(f.manifest, f.config, f.index) for f in got] == [(b"m", b"c", None), (b"M", b"C", b"I")]
    assert "/.multiarch/arm64:v8/" in got[0].where and ".multiarch" not in got[1].where, got
    # only the default dir for the default platform; nothing for unknown tags or bad names
    assert len(repo.published("reg.example", "team/app", "v1", Platform("linux", "amd64"))) == 1
    assert repo.published("reg.example", "team/app", "v2", arm) == []
    assert repo.published("reg.example", "../../etc", "v1", arm) == []
    # a file over the limit is not read
    _write_tag(layout, {"config.json": b"x" * (repository_mod.MAX_CONFIG + 1)})
    assert repo.published("reg.example", "team/app", "v1", Platform("linux", "amd64"))[0].config is None


def test_published_of_a_hung_repository_is_nothing_within_the_timeout(layout, tmp_path, monkeypatch):
    from cvmfs_common.oci.platform import Platform

    _write_tag(layout, {"manifest.json": b"M", "config.json": b"C"})
    release = threading.Event()
    real = repository_mod._small
    monkeypatch.setattr(repository_mod, "_small", lambda path, limit: real(path, limit) if release.wait(60) else None)
    remote = build_remote_layers([str(layout.root)], TIMEOUT, 5.0)
    try:
        started = time.monotonic()
        assert remote.published("reg.example", "team/app", "v1", Platform("linux", "amd64")) == []
        assert time.monotonic() - started < TIMEOUT + MARGIN
    finally:
        release.set()
        remote.close()
