"""One writer per repository: runs with different state DBs on one root never overlap."""
from __future__ import annotations

import os
from pathlib import Path

from cvmfs_common.repo.paths import RepositoryLayout
from publisher.core.runlock import LOCK_DIR_ENV, exclusive_repository, repository_lock_path
from tests.fixtures.images import BuiltImage

from tests.publisher.clirun import popen_cli, run_cli, run_proc, write_wishlist
from tests.publisher.conftest import requires_root
from tests.publisher.sync.test_crash import _wait_for_work, big_image  # noqa: F401 (fixture)


def test_the_lock_is_one_per_repository_whatever_its_spelling(tmp_path: Path, monkeypatch) -> None:
    assert repository_lock_path(tmp_path).parent == tmp_path.parent / "repository-locks"  # conftest
    monkeypatch.delenv(LOCK_DIR_ENV)
    assert repository_lock_path(tmp_path).parent == Path("/run/lock")
    (tmp_path / "repo").mkdir()
    os.symlink("repo", tmp_path / "alias")
    assert repository_lock_path(tmp_path / "repo") == repository_lock_path(tmp_path / "alias")
    assert repository_lock_path(tmp_path / "repo") != repository_lock_path(tmp_path / "other")


def test_gc_and_convert_with_another_state_db_meet_the_lock(tmp_path: Path, capsys) -> None:
    root = tmp_path / "repo"
    wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])
    with exclusive_repository(root):
        res = run_cli("convert", wl, "--repository-root", root, "--state-db", tmp_path / "a.db")
        assert res.rc == 2
        err = capsys.readouterr().err
        assert f"is writing repository {os.path.realpath(root)}" in err and f"pid {os.getpid()}" in err, err
        (tmp_path / "b.db").touch()
        res = run_cli("gc", "--lock-wait", "0s", "--repository-root", root, "--state-db", tmp_path / "b.db")
        assert res.rc == 2 and "is writing repository" in capsys.readouterr().err


@requires_root
def test_two_converts_with_different_state_dbs_on_one_root(big_image: BuiltImage,  # noqa: F811
                                                           tmp_path: Path) -> None:
    root = tmp_path / "repo"
    lay = RepositoryLayout(root)
    wishlist = write_wishlist(tmp_path / "w.yaml", [big_image.ref])
    first = popen_cli("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "a.db",
                      log=tmp_path / "a.log")
    try:
        _wait_for_work(lay.tmp_dir, "layer-")  # the first one is writing
        second = run_proc("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "b.db")
        assert second.rc == 2, second.stdout + second.stderr
        assert f"is writing repository {os.path.realpath(root)}" in second.stderr, second.stderr
        assert "pid" in second.stderr and str(first.pid) in second.stderr, second.stderr
        assert first.wait(300) == 0, (tmp_path / "a.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    again = run_proc("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "b.db")
    assert again.rc == 0 and "1 new" in again.stdout and "0 layers fetched" in again.stdout, again.stdout
    for db in ("a.db", "b.db"):
        res = run_proc("check", "--repository-root", root, "--state-db", tmp_path / db)
        assert res.rc == 0 and ": 0 problems" in res.stdout, res.stdout
