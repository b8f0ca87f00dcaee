"""Fixtures of the publisher's tests: repository dirs, the cvmfs_server stand-in, a big image."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.images import BuiltImage
from tests.publisher.cvmfs_standin import STANDIN_DIR, CvmfsStandin
from tests.publisher.inflight import push_big_image
from tests.publisher.treeview import tree_snapshot


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository root with its .tmp/ work area."""
    root = tmp_path / "repo"
    (root / ".tmp").mkdir(parents=True)
    return root


@pytest.fixture
def work(repo: Path) -> Path:
    """Where a layer is unpacked (does not exist yet)."""
    return repo / ".tmp" / "layer-work"


@pytest.fixture
def outside(tmp_path: Path):
    """A directory a hostile layer would love to write into; checked unchanged afterwards."""
    victim = tmp_path / "outside"
    (victim / "etc").mkdir(parents=True)
    (victim / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    before = tree_snapshot(victim)
    yield victim
    assert tree_snapshot(victim) == before


@pytest.fixture(autouse=True, scope="session")
def _repository_locks(tmp_path_factory: pytest.TempPathFactory):
    """Repository lock files of the tests (and the CLI processes they start) go to a temp
    dir, not the machine's /run/lock. Session-wide: module fixtures convert too."""
    from publisher.core.runlock import LOCK_DIR_ENV

    before = os.environ.get(LOCK_DIR_ENV)
    os.environ[LOCK_DIR_ENV] = str(tmp_path_factory.getbasetemp() / "repository-locks")
    yield
    if before is None:
        os.environ.pop(LOCK_DIR_ENV, None)
    else:
        os.environ[LOCK_DIR_ENV] = before


@pytest.fixture
def cvmfs_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CvmfsStandin:
    """`cvmfs_server` first on PATH (inherited by subprocesses), repositories under tmp."""
    s = CvmfsStandin(tmp_path / "cvmfs", tmp_path / "standin-state")
    s.root.mkdir()
    monkeypatch.setenv("CVMFS_STANDIN_ROOT", str(s.root))
    monkeypatch.setenv("CVMFS_STANDIN_STATE", str(s.state))
    monkeypatch.setenv("PATH", f"{STANDIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CVMFS_SERVER", raising=False)
    return s


@pytest.fixture(scope="module")
def big_image(registry, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """An image whose middle layer takes a moment to unpack (inflight.py), on `registry`."""
    return push_big_image(registry.host, tmp_path_factory.mktemp("big"))
