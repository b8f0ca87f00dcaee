"""Tree walks and removals of any depth (deeper than PATH_MAX and the recursion limit)."""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from cvmfs_common.fsutil.fdtree import DirCursor, TreeMoved, lstat_tree, remove_tree
from cvmfs_common.repo.paths import RepositoryLayout

DEPTH = 5000  # 2 bytes a level: 10 000-byte paths, far beyond PATH_MAX (4096)


def deep_tree(top: Path, depth: int = DEPTH, *, read_only: bool = False) -> None:
    """top/d/d/.../d (``depth`` levels) with a file and a symlink every 500 levels
    (creating entries that deep is slow: the kernel's cost grows with the depth)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    opened = [fd]
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            if level % 500 == 0:
                with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
                    f.write("x")
                os.symlink("/", "s", dir_fd=fd)
            fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            opened.append(fd)
            if len(opened) > 2:
                parent = opened.pop(-2)
                if read_only:
                    os.fchmod(parent, 0o555)
                os.close(parent)
    finally:
        for fd in opened:
            os.close(fd)


def test_remove_and_walk_a_tree_deeper_than_path_max(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    deep_tree(top)
    assert sys.getrecursionlimit() < DEPTH
    stats = list(lstat_tree(top))
    assert len(stats) == 1 + DEPTH + 2 * (DEPTH // 500)
    assert sum(1 for s in stats if stat.S_ISDIR(s.st_mode)) == DEPTH + 1
    remove_tree(top)
    assert not os.path.lexists(top)
    assert os.path.isdir("/etc")  # the symlinks to / were not followed


def test_clean_tmp_removes_deep_leftovers(tmp_path: Path) -> None:
    lay = RepositoryLayout(tmp_path / "repo")
    work = lay.make_work_dir("layer-")
    deep_tree(work / "layerfs")
    assert lay.clean_tmp() == 1
    assert list(lay.tmp_dir.iterdir()) == []


def test_remove_tree_of_symlinks_files_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("k")
    os.symlink(tmp_path / "target", tmp_path / "link")
    remove_tree(tmp_path / "link")
    assert (tmp_path / "target" / "keep").exists() and not os.path.lexists(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    remove_tree(tmp_path / "file")
    remove_tree(tmp_path / "missing")
    remove_tree(tmp_path / "missing-parent" / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def _as_nobody_remove(top: Path) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            deep_tree(top / "ro", 300, read_only=True)
            os.chmod(top / "ro", 0o555)
            os.mkdir(top / "locked")
            os.chmod(top / "locked", 0)  # not even readable
            remove_tree(top / "ro")
            remove_tree(top / "locked")
            code = 0 if not os.path.lexists(top / "ro") and not os.path.lexists(top / "locked") else 3
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_read_only_dirs_are_made_writable_without_privileges(tmp_path: Path) -> None:
    top = Path(tempfile.mkdtemp(prefix="fdtree-"))  # pytest's tmp_path is root's alone (0700)
    try:
        os.chmod(top, 0o755)
        os.chown(top, 65534, 65534)
        assert _as_nobody_remove(top) == 0
    finally:
        remove_tree(top)


def test_cursor_walks_down_and_up_and_notices_a_moved_tree(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "file").write_text("x")
    with DirCursor.open(tmp_path / "a") as cur:
        assert cur.down("b") and cur.present
        assert not cur.down("nothing") and not cur.present
        assert not cur.down("deeper")
        cur.up()
        cur.up()
        assert cur.present and sorted(os.listdir(cur.fd)) == []
        cur.up()
        assert sorted(os.listdir(cur.fd)) == ["b", "file"]
        assert not cur.down("file")
        cur.up()
        assert cur.down("b")
        os.rename(tmp_path / "a" / "b", tmp_path / "b-moved")
        with pytest.raises(TreeMoved):
            cur.up()
