"""Directories and mounts on their own (snapshotter/fs.py): the usage walk, removal of deep
trees, orphans, and the mount specs containerd's overlayfs snapshotter would give."""

import os
from pathlib import Path

import pytest

from snapshotter.fs import SnapshotDirs, disk_usage
from snapshotter.model import Kind, Lower, Mount, Snapshot, Usage
from tests.fixtures.marks import requires_root
from tests.snapshotter.deep_tree import make_chain, remove_everything


@pytest.fixture
def dirs(tmp_path: Path):
    d = SnapshotDirs(tmp_path / "root", ("index=off",))
    yield d
    d.close()


# -- usage ---------------------------------------------------------------------------------------

def test_usage_counts_each_inode_once_with_its_blocks(tmp_path):
    top = tmp_path / "t"
    (top / "sub").mkdir(parents=True)
    (top / "big").write_bytes(os.urandom(100_000))
    (top / "sub" / "small").write_bytes(b"x")
    os.link(top / "big", top / "sub" / "hardlink")  # the same inode: counted once
    os.symlink("big", top / "sym")
    (top / "sparse").touch()
    os.truncate(top / "sparse", 10 << 20)  # 10 MiB apparent, no blocks
    inodes = [top, top / "sub", top / "big", top / "sub" / "small", top / "sym", top / "sparse"]
    assert disk_usage(str(top)) == Usage(sum(os.lstat(p).st_blocks * 512 for p in inodes), 6)
    # and plausibly so: the random file's 100 kB are allocated, the sparse file's 10 MiB are not
    assert 100_000 <= disk_usage(str(top)).size < 1 << 20


def test_usage_of_a_missing_path_or_a_file(tmp_path):
    assert disk_usage(str(tmp_path / "missing")) == Usage(0, 0)
    (tmp_path / "f").write_bytes(b"x" * 5000)
    assert disk_usage(str(tmp_path / "f")) == Usage(os.lstat(tmp_path / "f").st_blocks * 512, 1)


def test_usage_of_a_tree_deeper_than_path_max(tmp_path):
    top = tmp_path / "deep"
    top.mkdir()
    try:
        make_chain(str(top), 3000)  # "d/" * 3000: 6000 characters, beyond PATH_MAX
        usage = disk_usage(str(top))
    finally:
        remove_everything(str(top))  # pytest's own clean-up recurses per level
    assert usage.inodes == 3000 + 2  # top, 3000 dirs, the file
    assert usage.size >= 10_000 + 3001 * 512


# -- removal -------------------------------------------------------------------------------------

def test_a_deep_tree_is_removed_without_recursion(dirs):
    dirs.create(1, Kind.ACTIVE, None, [])
    make_chain(dirs.fs_dir(1), 5000)
    doomed = []
    dirs.detach(1, doomed)
    assert [os.path.basename(x.origin) for x in doomed] == ["1"]
    assert not os.path.exists(dirs.snapshots / "1") and os.path.isdir(doomed[0].path)
    assert dirs.delete(doomed) == []
    assert os.listdir(dirs.snapshots) == []


def test_orphans_are_doomed_and_known_ids_kept(dirs):
    for i in (1, 2):
        dirs.create(i, Kind.ACTIVE, None, [])
        dirs.link_committed(i)
    (dirs.snapshots / "new-3").mkdir()  # a crash in the middle of create
    doomed = []
    dirs.doom_orphans({1}, doomed)
    assert sorted(x.origin for x in doomed) == sorted(
        [str(dirs.snapshots / "2"), str(dirs.snapshots / "new-3"), dirs.link(2)])
    assert dirs.delete(doomed) == []
    assert sorted(os.listdir(dirs.snapshots)) == ["1"] and os.listdir(dirs.links) == ["1"]


@requires_root  # the copied root attributes include an owner
def test_create_copies_the_root_attributes_and_replaces_leftovers(dirs):
    (dirs.snapshots / "7" / "fs").mkdir(parents=True)  # left by a crash before its row was committed
    (dirs.snapshots / "7" / "fs" / "stale").touch()
    doomed = []
    dirs.create(7, Kind.VIEW, (0o40750, 1234, 5678), doomed)
    st = os.stat(dirs.fs_dir(7))
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 1234, 5678)
    assert os.listdir(dirs.fs_dir(7)) == [] and not os.path.exists(dirs.work_dir(7))  # a view has no work dir
    assert len(doomed) == 1 and os.path.exists(os.path.join(doomed[0].path, "fs", "stale"))
    dirs.delete(doomed)


# -- mounts ----------------------------------------------------------------------------------------

def test_mounts_without_lowers_are_binds(dirs):
    fs1 = str(dirs.snapshots / "1" / "fs")
    assert dirs.mounts(Snapshot(1, Kind.ACTIVE, ())) == [Mount("bind", fs1, ("rw", "rbind"))]
    assert dirs.mounts(Snapshot(1, Kind.VIEW, ())) == [Mount("bind", fs1, ("ro", "rbind"))]


def test_a_view_of_one_lower_binds_the_directory_it_shows(dirs):
    assert dirs.mounts(Snapshot(5, Kind.VIEW, (Lower(2, None),))) == [
        Mount("bind", str(dirs.snapshots / "2" / "fs"), ("ro", "rbind"))]
    assert dirs.mounts(Snapshot(5, Kind.VIEW, (Lower(2, "/repo/.chains/ab/x"),))) == [
        Mount("bind", "/repo/.chains/ab/x", ("ro", "rbind"))]


def test_overlays_name_every_lower_by_its_link_nearest_first(dirs):
    root = str(dirs.root)
    lowers = (Lower(3, "/repo/.layers/x/layerfs"), Lower(2, None), Lower(1, None))
    assert dirs.mounts(Snapshot(4, Kind.ACTIVE, lowers)) == [Mount("overlay", "overlay", (
        "index=off", f"workdir={root}/snapshots/4/work", f"upperdir={root}/snapshots/4/fs",
        f"lowerdir={root}/l/3:{root}/l/2:{root}/l/1"))]
    assert dirs.mounts(Snapshot(4, Kind.VIEW, lowers[:2])) == [
        Mount("overlay", "overlay", ("index=off", f"lowerdir={root}/l/3:{root}/l/2"))]


def test_a_stack_built_on_a_known_one_names_every_lower(dirs):
    """The lowerdir of a stack one layer above a stack asked for before reuses its string."""
    for depth in range(1, 40):
        stack = tuple(Lower(i, None) for i in range(depth, 0, -1))  # a chain 1..depth, top first
        (m,) = dirs.mounts(Snapshot(1000 + depth, Kind.ACTIVE, stack))
        lowerdir = next(o for o in m.options if o.startswith("lowerdir="))
        assert lowerdir == "lowerdir=" + ":".join(dirs.link(i) for i in range(depth, 0, -1))
    other = (Lower(77, "/repo/chain"), Lower(5, None))  # another stack over 5: its own string
    (m,) = dirs.mounts(Snapshot(2000, Kind.ACTIVE, other))
    assert f"lowerdir={dirs.link(77)}:{dirs.link(5)}" in m.options


def test_links_point_at_our_dir_or_the_repository(dirs):
    dirs.create(1, Kind.ACTIVE, None, [])
    dirs.link_committed(1)
    dirs.link_remote(2, "/repo/.layers/x/layerfs")
    assert os.readlink(dirs.link(1)) == "../snapshots/1/fs"
    assert os.readlink(dirs.link(2)) == "/repo/.layers/x/layerfs"
    dirs.link_remote(2, "/repo/.chains/y")  # replaced atomically, no leftover .tmp
    assert os.readlink(dirs.link(2)) == "/repo/.chains/y" and sorted(os.listdir(dirs.links)) == ["1", "2"]
