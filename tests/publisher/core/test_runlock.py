"""One writer per repository: runs with different state DBs on one root never overlap."""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from publisher.core.runlock import LOCK_DIR_ENV, exclusive_repository, repository_lock_path
from tests.fixtures.images import BuiltImage

from tests.publisher.clirun import popen_cli, run_cli, run_proc, write_wishlist
from tests.fixtures.marks import requires_root
from tests.publisher.inflight import wait_for_work


def test_the_lock_is_one_per_repository_whatever_its_spelling(tmp_path: Path, monkeypatch) -> None:
    assert repository_lock_path(tmp_path).parent == tmp_path.parent / "repository-locks"  # conftest
    monkeypatch.delenv(LOCK_DIR_ENV)
    assert repository_lock_path(tmp_path).parent == (
        Path("/run/cvmfs-publisher") if os.geteuid() == 0 else Path(tempfile.gettempdir()) / f"cvmfs-publisher-{os.geteuid()}"
    ) or os.environ.get("XDG_RUNTIME_DIR")
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


def test_two_converts_with_different_state_dbs_on_one_root(big_image: BuiltImage,  # noqa: F811
                                                           tmp_path: Path) -> None:
    root = tmp_path / "repo"
    lay = RepositoryLayout(root)
    wishlist = write_wishlist(tmp_path / "w.yaml", [big_image.ref])
    first = popen_cli("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "a.db",
                      log=tmp_path / "a.log")
    try:
        wait_for_work(lay.tmp_dir, "layer-")  # the first one is writing
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


def _lock_name(root: Path) -> str:
    return repository_lock_path(root).name


def _as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]


ESCAPES = "pid 1: \x1b]0;owned\x07\x1b[2J\x1b[31mred" + "x" * 5000


def _held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@requires_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to act as nobody")
def test_a_lock_another_user_planted_does_not_stop_root(tmp_path: Path, monkeypatch) -> None:
    """`nobody` takes the lock's name in the world-writable /run/lock first, writes terminal
    escapes into it and holds it: root's convert goes on (its lock lives where only root
    creates names)."""
    monkeypatch.delenv(LOCK_DIR_ENV)
    root = tmp_path / "repo"
    planted = Path("/run/lock") / _lock_name(root)
    script = f'printf "%s" "$1" > {planted} && exec flock -n {planted} sleep 600'
    holder = subprocess.Popen(_as_nobody("sh", "-c", script, "sh", ESCAPES))
    try:
        deadline = time.monotonic() + 30
        while not _held(planted):
            assert holder.poll() is None and time.monotonic() < deadline, "nobody's lock holder did not start"
            time.sleep(0.05)
        wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])  # nothing listens there: the image fails
        res = run_proc("convert", wl, "--repository-root", root, "--state-db", tmp_path / "s.db", "--no-podman-store")
        assert res.rc == 1 and "1 failed" in res.stdout, res.stdout + res.stderr
        assert "is writing" not in res.stderr and "\x1b" not in res.stderr, res.stderr
        assert repository_lock_path(root).parent == Path("/run/cvmfs-publisher")
        st = os.stat("/run/cvmfs-publisher")
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    finally:
        holder.kill()
        holder.wait()
        planted.unlink(missing_ok=True)
        repository_lock_path(root).unlink(missing_ok=True)


@requires_root
def test_a_lock_directory_of_another_user_is_refused_plainly(tmp_path: Path, monkeypatch) -> None:
    planted = tmp_path / "locks"
    planted.mkdir()
    os.chown(planted, 65534, 65534)  # nobody's
    monkeypatch.setenv(LOCK_DIR_ENV, str(planted))
    wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])
    res = run_proc("convert", wl, "--repository-root", tmp_path / "repo", "--state-db", tmp_path / "s.db")
    assert res.rc == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"lock directory {planted} is owned by uid 65534" in res.stderr, res.stderr
    assert list(planted.iterdir()) == []


def test_a_symlink_as_lock_file_is_not_followed(tmp_path: Path, capsys) -> None:
    root = tmp_path / "repo"
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    lock = repository_lock_path(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, lock)
    try:
        wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])
        res = run_cli("convert", wl, "--repository-root", root, "--state-db", tmp_path / "s.db")
        assert res.rc == 2 and f"lock file {lock}" in capsys.readouterr().err
        assert victim.read_text() == "keep\n"
    finally:
        lock.unlink()


def test_the_holder_text_is_printed_without_terminal_escapes(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])
    with exclusive_repository(root):
        repository_lock_path(root).write_text(ESCAPES)  # what a hostile holder could have written
        res = run_proc("convert", wl, "--repository-root", root, "--state-db", tmp_path / "s.db")
    assert res.rc == 2, res.stdout + res.stderr
    assert "another cvmfs-publisher (pid 1: ?]0;owned??[2J?[31mredxxx" in res.stderr, res.stderr
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr and "x" * 300 not in res.stderr, res.stderr
