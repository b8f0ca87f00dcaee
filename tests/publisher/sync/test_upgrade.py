"""The repository format version (publisher/sync/upgrade.py): written with the first unit of
an empty repository, upgrades run once on a repository without it, a newer one is refused."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from cvmfs_common.fsutil.atomic import remove_tree
from cvmfs_common.repo.paths import RepositoryLayout

from publisher.backend.base import Backend, BackendError
from publisher.core.state import State
from publisher.sync.upgrade import FORMAT_VERSION
from tests.fixtures.images import StandardImages
from tests.fixtures.marks import requires_root
from tests.publisher.clirun import run_cli


def _convert(ref: str, root: Path, db: Path):
    return run_cli("convert-image", ref, "--repository-root", root, "--state-db", db)


@requires_root
def test_the_first_unit_of_an_empty_repository_records_the_format(standard_images: StandardImages,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """No unit of its own (on CernVM-FS: no revision of its own): the format goes with the
    first image."""
    units: list[str] = []
    real_unit = Backend.unit

    @contextlib.contextmanager
    def counting_unit(self, what):
        units.append(what)
        with real_unit(self, what):
            yield

    monkeypatch.setattr(Backend, "unit", counting_unit)
    root, db = tmp_path / "repo", tmp_path / "state.db"
    res = _convert(standard_images.tagged["2.0"].ref, root, db)
    assert res.rc == 0 and "1 new" in res.stdout, res.stdout
    assert (root / ".metadata/.format").read_text() == f"{FORMAT_VERSION}\n"
    assert units and not any(u.startswith("repository format") for u in units), units
    units.clear()
    assert _convert(standard_images.tagged["2.0"].ref, root, db).rc == 0
    assert units == []  # nothing changed: no unit


@requires_root
def test_a_newer_format_is_refused_before_anything_is_written(standard_images: StandardImages,
                                                              tmp_path: Path, capsys) -> None:
    img = standard_images.tagged["1.0"]
    root, db = tmp_path / "repo", tmp_path / "state.db"
    assert _convert(img.ref, root, db).rc == 0
    (root / ".metadata/.format").write_text(f"{FORMAT_VERSION + 1}\n")
    other = standard_images.tagged["2.0"]
    res = _convert(other.ref, root, db)
    assert res.rc == 2
    err = capsys.readouterr().err
    assert f"repository format {FORMAT_VERSION + 1}, newer than this publisher's {FORMAT_VERSION}" in err, err
    assert not os.path.lexists(RepositoryLayout(root).link_path(other.host, other.name, other.tag))


@requires_root
def test_a_failed_upgrade_leaves_the_old_format_and_the_next_run_does_it(standard_images: StandardImages,
                                                                         tmp_path: Path, monkeypatch) -> None:
    """Idempotent steps, the version written last in their unit: a run whose upgrade unit
    fails (or is killed) publishes as before, the next one upgrades."""
    img = standard_images.tagged["2.0"]
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    assert _convert(img.ref, root, db).rc == 0
    flat = lay.flat_dir(img.config_digest)
    remove_tree(flat / ".singularity.d")  # what an older version wrote
    (root / ".metadata/.format").unlink()

    real_unit = Backend.unit

    @contextlib.contextmanager
    def failing_upgrade(self, what):
        if what.startswith("repository format"):
            raise BackendError("cvmfs_server transaction failed (injected)")
        with real_unit(self, what):
            yield

    monkeypatch.setattr(Backend, "unit", failing_upgrade)
    res = _convert(img.ref, root, db)
    assert res.rc == 0 and "1 unchanged" in res.stdout, res.stdout
    assert not (root / ".metadata/.format").exists()
    monkeypatch.setattr(Backend, "unit", real_unit)

    res = _convert(img.ref, root, db)
    assert res.rc == 0 and "1 updated" in res.stdout, res.stdout  # marked by the upgrade, published again
    assert (flat / ".singularity.d/runscript").is_file()
    assert (root / ".metadata/.format").read_text() == f"{FORMAT_VERSION}\n"
    with State.open(db, root) as st:
        assert st.conn.execute("SELECT count(*) FROM repairs").fetchone()[0] == 0
    res = _convert(img.ref, root, db)
    assert res.rc == 0 and "1 unchanged" in res.stdout, res.stdout


@pytest.mark.parametrize("text", ["x\n", "-1\n", ""])
def test_an_unreadable_format_file_is_refused(tmp_path: Path, text: str) -> None:
    from publisher.sync.upgrade import RepositoryFormatError, read_format

    (tmp_path / ".metadata").mkdir()
    (tmp_path / ".metadata/.format").write_text(text)
    with pytest.raises(RepositoryFormatError, match="not a format version"):
        read_format(RepositoryLayout(tmp_path))
