"""User namespaces: the mapping labels, and idmapped lowers made with the kernel's mount API
(real mounts; the mount cases need root and skip without it)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from snapshotter.core import Snapshotter
from snapshotter.errors import FailedPrecondition, InvalidArgument, NotFound
from snapshotter.idmap import GIDMAP_LABEL, UIDMAP_LABEL, IdMap, IdMapError

MAP = {UIDMAP_LABEL: "0:100000:65536", GIDMAP_LABEL: "0:200000:65536"}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="idmapped and overlay mounts need root")


def test_labels_parse_as_containerd_writes_them():
    m = IdMap.from_labels({UIDMAP_LABEL: "0:100000:1000,1000:5000:10", GIDMAP_LABEL: "0:200000:65536"})
    assert m.root() == (100000, 200000)
    assert m.map_owner(1000, 1000) == (5000, 201000)
    assert m.map_owner(2000, 70000) == (65534, 65534)
    assert IdMap.decode(m.encode()) == m
    assert IdMap.from_labels({"other": "x"}) is None


@pytest.mark.parametrize("labels", [
    {UIDMAP_LABEL: "0:100000:65536"},                               # gid map missing
    {UIDMAP_LABEL: "0:100000", GIDMAP_LABEL: "0:1:1"},               # not ctr:host:size
    {UIDMAP_LABEL: "1:100000:10", GIDMAP_LABEL: "0:1:10"},           # no root entry
    {UIDMAP_LABEL: "0:4294967295:10", GIDMAP_LABEL: "0:1:10"},       # out of range
])
def test_bad_labels_are_refused(labels, tmp_path):
    with pytest.raises(IdMapError):
        IdMap.from_labels(labels)
    sn = Snapshotter(tmp_path / "root")
    try:
        with pytest.raises(InvalidArgument):
            sn.prepare("k", "", labels)
        assert sn.walk([]) == []
    finally:
        sn.close()


@pytest.fixture
def sn(tmp_path: Path):
    s = Snapshotter(tmp_path / "root")
    yield s
    s.close()


def _opt(options, name):
    return next(o.split("=", 1)[1] for o in options if o.startswith(name + "="))


def _committed(sn, name, parent, files: dict[str, tuple[int, int]]):
    (m,) = sn.prepare(f"tmp-{name}", parent, {})
    upper = m.source if m.type == "bind" else _opt(m.options, "upperdir")
    for rel, (uid, gid) in files.items():
        p = Path(upper, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
        os.chown(p, uid, gid)
    sn.commit(name, f"tmp-{name}", {})


def _mount(m, target: Path) -> None:
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)],
                   check=True, capture_output=True)


def _mounts_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path) + "/")]


@needs_root
def test_userns_snapshot_shows_the_lowers_with_the_pods_ids(sn, tmp_path):
    _committed(sn, "a", "", {"etc/passwd": (0, 0), "opt/app": (1000, 1000)})
    _committed(sn, "b", "a", {"bin/sh": (0, 0)})
    (m,) = sn.prepare("ctr", "b", dict(MAP))
    assert m.type == "overlay"
    lowers = _opt(m.options, "lowerdir").split(":")
    assert all(p.startswith(str(sn.root / "idmap") + "/") for p in lowers)
    upper = Path(_opt(m.options, "upperdir"))
    assert (upper.stat().st_uid, upper.stat().st_gid) == (100000, 200000)
    target = tmp_path / "mnt"
    target.mkdir()
    _mount(m, target)
    try:
        for rel, owner in (("etc/passwd", (100000, 200000)), ("opt/app", (101000, 201000)),
                           ("bin/sh", (100000, 200000))):
            st = (target / rel).stat()
            assert (st.st_uid, st.st_gid) == owner, rel
        # Reading copies nothing up; a write lands in the upper dir, nothing else.
        assert (target / "opt/app").read_text() == "opt/app"
        (target / "new").write_text("x")
        assert sorted(os.listdir(upper)) == ["new"]
    finally:
        subprocess.run(["umount", str(target)], check=True)
    # Mounts() answers the same, and makes the idmapped lowers again after a reboot.
    for lower in lowers:
        subprocess.run(["umount", lower], check=True)
    assert sn.mounts("ctr") == [m]
    assert len(_mounts_under(sn.root / "idmap")) == 2
    sn.remove("ctr")
    assert _mounts_under(sn.root / "idmap") == [] and os.listdir(sn.root / "idmap") == []
    # The lowers themselves were never touched.
    assert Path(sn.dirs.fs_dir(1), "opt/app").stat().st_uid == 1000


@needs_root
def test_userns_view_of_one_layer_and_empty_active(sn, tmp_path):
    _committed(sn, "a", "", {"f": (0, 0)})
    (v,) = sn.view("v", "a", dict(MAP))
    assert v.type == "bind" and v.source.startswith(str(sn.root / "idmap") + "/")
    assert Path(v.source, "f").stat().st_uid == 100000
    (e,) = sn.prepare("empty", "", dict(MAP))
    assert e.type == "bind" and Path(e.source).stat().st_uid == 100000
    sn.remove("v")
    assert _mounts_under(sn.root / "idmap") == []


@needs_root
def test_cleanup_releases_idmapped_lowers_a_crash_left(sn):
    _committed(sn, "a", "", {"f": (0, 0)})
    _committed(sn, "b", "a", {"g": (0, 0)})
    sn.prepare("ctr", "b", dict(MAP))
    # A crash after the row went, before the detach: Cleanup finds the mounts without row.
    sn.idmapped.release = lambda snapshot_id: None
    sn.remove("ctr")
    assert len(_mounts_under(sn.root / "idmap")) == 2
    sn.cleanup()
    assert _mounts_under(sn.root / "idmap") == [] and os.listdir(sn.root / "idmap") == []


@needs_root
def test_mounts_racing_remove_leaves_no_idmapped_mounts(sn):
    """A Remove that ends between Mounts' read of the row and its idmapped mounts released
    nothing yet: Mounts detaches what it made and answers NotFound."""
    _committed(sn, "a", "", {"f": (0, 0)})
    sn.prepare("ctr", "a", dict(MAP))
    for lower in _mounts_under(sn.root / "idmap"):  # as after a reboot: Mounts makes them again
        subprocess.run(["umount", lower], check=True)
    ensure = sn.idmapped.ensure

    def remove_first(*args):
        sn.remove("ctr")
        return ensure(*args)

    sn.idmapped.ensure = remove_first
    with pytest.raises(NotFound):
        sn.mounts("ctr")
    assert _mounts_under(sn.root / "idmap") == [] and os.listdir(sn.root / "idmap") == []


@needs_root
@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None or not os.path.exists("/dev/fuse"),
                    reason="needs fuse-overlayfs and /dev/fuse (a FUSE file system for the lower)")
def test_a_lower_on_fuse_fails_fast_with_the_capability_to_declare(sn, tmp_path):
    """A FUSE mount whose server does not allow idmapping (CernVM-FS's, fuse-overlayfs's)."""
    src, fuse = tmp_path / "src", tmp_path / "fuse"
    src.mkdir()
    fuse.mkdir()
    (src / "f").write_text("x")
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={src}", str(fuse)], check=True)
    try:
        _committed(sn, "a", "", {})
        # Stand in for a repository layer: the committed snapshot shows the FUSE dir.
        sn.dirs.link_remote(1, str(fuse))
        sn.store._conn().execute("UPDATE snapshots SET source = ? WHERE id = 1", (str(fuse),))
        sn.store._stacks.clear()
        _committed(sn, "b", "a", {"g": (0, 0)})
        with pytest.raises(FailedPrecondition, match="only-remap-ids"):
            sn.prepare("ctr", "b", dict(MAP))
        assert [i.name for i in sn.walk([])] == ["a", "b"]  # nothing half made is left
        assert _mounts_under(sn.root / "idmap") == [] and os.listdir(sn.root / "idmap") == []
    finally:
        subprocess.run(["umount", str(fuse)], check=False)


@needs_root
def test_a_parent_containerd_chowned_already_is_not_idmapped_again(sn, tmp_path):
    """No remap-ids declared: containerd prepares "<id>-remap", chowns it all, commits it, and
    still sends the labels on the container's Prepare: its lowers are shown as they are."""
    _committed(sn, "a", "", {"f": (0, 0)})
    (m,) = sn.prepare("x-remap", "a", {})
    upper = Path(_opt(m.options, "upperdir"))
    for p in (upper, upper / "f"):
        if p != upper:
            p.write_text("f")
        os.chown(p, 100000, 200000)
    sn.commit("remapped", "x-remap", {})
    (c,) = sn.prepare("ctr", "remapped", dict(MAP))
    assert all(not p.startswith(str(sn.root / "idmap")) for p in _opt(c.options, "lowerdir").split(":"))
    assert Path(_opt(c.options, "upperdir")).stat().st_uid == 100000
    assert os.listdir(sn.root / "idmap") == []


def test_overlay_metacopy_on_every_overlay(tmp_path):
    s = Snapshotter(tmp_path / "root", metacopy=True)
    try:
        _committed(s, "a", "", {})
        _committed(s, "b", "a", {})
        for m in (s.prepare("c", "b", {})[0], s.view("v", "b", {})[0]):
            assert m.type == "overlay" and "metacopy=on" in m.options
    finally:
        s.close()
