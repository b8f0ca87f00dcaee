"""publisher.write.chains: chain N = chain N-1 + layer N, by hard links, never editing a shared inode."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import sha256_of
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import remove_tree
from publisher.write.chains import ChainMerger, build_chain
from tests.publisher.treeview import merge_view, tree_snapshot, diff_trees
from publisher.unpack.whiteouts import OPAQUE_XATTR

from tests.fixtures.marks import requires_root


def mk(root: Path, spec: dict[str, object]) -> Path:
    """Files from a dict: "a/b": "text" | ("dir", mode) | ("link", target) | ("wh",) | ("opq",)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, what in spec.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, str):
            p.write_text(what)
        elif what[0] == "dir":
            p.mkdir(exist_ok=True)
            os.chmod(p, what[1])
        elif what[0] == "link":
            p.symlink_to(what[1])
        elif what[0] == "wh":
            os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
        elif what[0] == "opq":
            p.mkdir(exist_ok=True)
            os.setxattr(p, OPAQUE_XATTR, b"y")
        elif what[0] == "mode":
            p.write_text(what[2])
            os.chmod(p, what[1])
    return root


def merge(tmp: Path, lower: Path | None, upper: Path, **kw) -> Path:
    out = tmp / f"out-{os.urandom(3).hex()}"
    ChainMerger(**kw).merge(out, lower, upper)
    return out


@requires_root
def test_overlay_whiteouts_opaque_and_replacement(tmp_path: Path) -> None:
    lower = mk(tmp_path / "lower", {"a/keep": "k", "a/gone": "g", "d/x": "x", "o/old": "o", "f": "f",
                                    "s": ("link", "a"), "r/sub/deep": "deep"})
    upper = mk(tmp_path / "upper", {"a/gone": ("wh",), "d": ("wh",), "o": ("opq",), "o/new": "n",
                                    "s": ("dir", 0o700), "s/in": "i", "f": ("dir", 0o755), "new": "new"})
    out = merge(tmp_path, lower, upper)
    snap = tree_snapshot(out)
    assert set(snap) == {"/", "/a", "/a/keep", "/o", "/o/new", "/s", "/s/in", "/f", "/new", "/r", "/r/sub",
                         "/r/sub/deep"}
    assert snap["/s"].type == "dir" and snap["/s"].mode == 0o700
    # the same as kernel overlay would show (merge_view models it)
    assert diff_trees(merge_view([upper, lower]), snap) == []
    assert OPAQUE_XATTR not in dict(snap["/o"].xattrs)


def test_raw_whiteouts_as_ducc_and_cvmfs_write_them(tmp_path: Path) -> None:
    lower = mk(tmp_path / "lower", {"a/keep": "k", "a/gone": "g", "o/old": "o", "x/y": "y"})
    upper = mk(tmp_path / "upper", {"a/.wh.gone": "", "o/.wh..wh..opq": "", "o/new": "n",
                                    ".wh.x": "", "x/z": "z"})
    snap = tree_snapshot(merge(tmp_path, lower, upper))
    # .wh.x deletes the lower x; the layer's own x/ (recreated) stays, without y
    assert set(snap) == {"/", "/a", "/a/keep", "/o", "/o/new", "/x", "/x/z"}


def test_entries_are_links_and_a_changed_entry_is_another_inode(tmp_path: Path) -> None:
    lower = mk(tmp_path / "lower", {"bin/tool": ("mode", 0o755, "v1"), "etc/conf": "c"})
    # chmod-only change: the layer ships the file again (its own inode)
    upper = mk(tmp_path / "upper", {"bin/tool": ("mode", 0o700, "v1")})
    before = {p: os.lstat(lower / p) for p in ("bin/tool", "etc/conf")}
    out = merge(tmp_path, lower, upper)
    assert os.stat(out / "etc/conf").st_ino == before["etc/conf"].st_ino
    assert os.stat(out / "bin/tool").st_ino == os.stat(upper / "bin/tool").st_ino
    assert os.stat(out / "bin/tool").st_mode & 0o777 == 0o700
    after = os.lstat(lower / "bin/tool")
    assert (after.st_mode, after.st_uid, after.st_ctime_ns) == (before["bin/tool"].st_mode,
                                                                 before["bin/tool"].st_uid,
                                                                 before["bin/tool"].st_ctime_ns)
    assert not (out / "bin").samefile(lower / "bin")  # directories are the chain's own


@requires_root
def test_directory_attributes_and_times_come_from_the_topmost_copy(tmp_path: Path) -> None:
    lower = mk(tmp_path / "lower", {"d": ("dir", 0o750), "d/f": "f"})
    os.chown(lower / "d", 1000, 1000)
    os.setxattr(lower / "d", "user.k", b"v")
    os.utime(lower / "d", ns=(1_000_000_000, 2_000_000_000))
    upper = mk(tmp_path / "upper", {"e": "e"})
    out = merge(tmp_path, lower, upper)
    st = os.stat(out / "d")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns) == (0o750, 1000, 1000, 2_000_000_000)
    assert os.getxattr(out / "d", "user.k") == b"v"
    upper2 = mk(tmp_path / "upper2", {"d": ("dir", 0o755)})
    out2 = merge(tmp_path, out, upper2)
    assert os.stat(out2 / "d").st_mode & 0o7777 == 0o755
    assert os.stat(out2 / "d").st_uid == 0 and "user.k" not in os.listxattr(out2 / "d")
    assert (out2 / "d/f").read_text() == "f"


def test_emlink_copies_and_keeps_hardlink_groups(tmp_path: Path) -> None:
    upper = mk(tmp_path / "upper", {"a": ("mode", 0o640, "data"), "l": ("link", "a")})
    os.link(upper / "a", upper / "b")
    os.setxattr(upper / "a", "user.x", b"1")

    upper_dir = os.stat(upper).st_ino

    def full(src, dst, *, src_dir_fd, dst_dir_fd, follow_symlinks=True):
        if os.fstat(src_dir_fd).st_ino == upper_dir:
            raise OSError(errno.EMLINK, "Too many links")
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)

    out = merge(tmp_path, None, upper, link=full)
    a, b = os.lstat(out / "a"), os.lstat(out / "b")
    assert a.st_ino == b.st_ino != os.lstat(upper / "a").st_ino  # one copy, both names
    assert (out / "a").read_text() == "data" and a.st_mode & 0o777 == 0o640
    assert os.getxattr(out / "a", "user.x") == b"1"
    assert os.readlink(out / "l") == "a"


@requires_root
def test_fifos_are_linked_and_copied_on_emlink(tmp_path: Path) -> None:
    upper = mk(tmp_path / "upper", {"run": ("dir", 0o755)})
    os.mkfifo(upper / "run/pipe", 0o620)
    os.chown(upper / "run/pipe", 7, 8)
    os.chmod(upper / "run/pipe", 0o620)
    out = merge(tmp_path, None, upper)
    assert os.lstat(out / "run/pipe").st_ino == os.lstat(upper / "run/pipe").st_ino

    def full(src, dst, *, src_dir_fd, dst_dir_fd, follow_symlinks=True):
        raise OSError(errno.EMLINK, "Too many links")

    out = merge(tmp_path, None, upper, link=full)
    st = os.lstat(out / "run/pipe")
    assert stat.S_ISFIFO(st.st_mode) and st.st_ino != os.lstat(upper / "run/pipe").st_ino
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o620, 7, 8)


def test_build_chain_publishes_atomically_and_once(tmp_path: Path) -> None:
    lay = RepositoryLayout(tmp_path / "repo")
    layer = mk(tmp_path / "layer", {"etc/os": "x"})
    chain = sha256_of(b"chain")
    path, stats = build_chain(lay, chain, None, layer)
    assert path == lay.chain_dir(chain) and (path / "etc/os").read_text() == "x"
    assert stats is not None and stats.linked == 1
    assert list(lay.tmp_dir.iterdir()) == []
    again, stats2 = build_chain(lay, chain, None, mk(tmp_path / "other", {"other": "y"}))
    assert again == path and stats2 is None and not (path / "other").exists()


def test_merger_refuses_nothing_it_cannot_link(tmp_path: Path) -> None:
    upper = mk(tmp_path / "upper", {"f": "f"})

    def broken(src, dst, *, src_dir_fd, dst_dir_fd, follow_symlinks=True):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        merge(tmp_path, None, upper, link=broken)


def _deep(top: Path, depth: int, leaf: dict[str, str]) -> None:
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        for name, what in leaf.items():
            if what == "wh":
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=fd)
            else:
                with open(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
                    f.write(what)
    finally:
        os.close(fd)


def _read_deep(top: Path, depth: int) -> dict[str, str]:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = {}
        for name in os.listdir(fd):
            with open(os.open(name, os.O_RDONLY, dir_fd=fd)) as f:
                out[name] = f.read()
        return out
    finally:
        os.close(fd)


@requires_root
@pytest.mark.skipif(os.geteuid() != 0, reason="whiteout devices need root")
def test_merges_trees_deeper_than_path_max(tmp_path: Path) -> None:
    depth = 5000  # 10 000-byte paths
    _deep(tmp_path / "lower", depth, {"old": "old", "gone": "gone"})
    _deep(tmp_path / "upper", depth, {"new": "new", "gone": "wh"})
    try:
        out = tmp_path / "out"
        ChainMerger().merge(out, tmp_path / "lower", tmp_path / "upper")
        assert _read_deep(out, depth) == {"old": "old", "new": "new"}
    finally:  # pytest's own clean-up recurses
        for name in ("lower", "upper", "out"):
            remove_tree(tmp_path / name)
