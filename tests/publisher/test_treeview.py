"""tests.publisher.treeview: snapshots and the overlay merge, checked against kernel overlayfs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.publisher.treeview import diff_trees, merge_view, tree_snapshot
from publisher.unpack.unpack import unpack_layer

from tests.fixtures.marks import needs_root, requires_root
from .layertar import blob, dir_, reg, sym

BASE = [dir_("etc"), reg("etc/a", b"a"), reg("etc/b", b"b"), dir_("etc/sub"), reg("etc/sub/c"),
        dir_("keep"), reg("keep/k"), dir_("opq"), reg("opq/old"), dir_("tofile"), reg("tofile/x"),
        reg("todir", b"f"), sym("link", "etc/a"), dir_("gone"), reg("gone/deep")]
TOP = [reg("etc/.wh.a"), reg("etc/sub/.wh..wh..opq"), reg("etc/sub/new"),
       dir_("opq", mode=0o700), reg("opq/.wh..wh..opq"), reg("opq/fresh"),
       reg("tofile", b"now a file"), dir_("todir"), reg("todir/inner"),
       reg(".wh.link"), reg(".wh.gone"), dir_("gone"), reg("gone/reborn")]


def _layers(tmp: Path, whiteouts: str) -> list[Path]:
    dirs = []
    for i, members in enumerate((BASE, TOP)):
        b = blob(members)
        unpack_layer(b.stream(), tmp / f"{whiteouts}{i}", digest=b.digest, whiteouts=whiteouts)
        dirs.append(tmp / f"{whiteouts}{i}")
    return dirs[::-1]


def test_snapshot_describes_entries(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"x")
    (tmp_path / "l").symlink_to("d/f")
    snap = tree_snapshot(tmp_path)
    assert list(snap) == ["/", "/d", "/d/f", "/l"]
    assert snap["/l"].type == "symlink" and snap["/l"].target == "d/f"
    assert snap["/d/f"].size == 1 and snap["/d/f"].sha256 is not None
    assert diff_trees(snap, snap) == []
    other = dict(snap)
    del other["/l"]
    assert diff_trees(snap, other) == ["/l: only in first"]


@requires_root
def test_merge_view_applies_both_whiteout_forms(tmp_path: Path) -> None:
    overlay, raw = merge_view(_layers(tmp_path, "overlay")), merge_view(_layers(tmp_path, "raw"))
    assert diff_trees(overlay, raw, ignore=("mtime_ns",)) == []
    assert sorted(overlay) == [
        "/", "/etc", "/etc/b", "/etc/sub", "/etc/sub/new", "/gone", "/gone/reborn", "/keep",
        "/keep/k", "/opq", "/opq/fresh", "/todir", "/todir/inner", "/tofile"]
    assert overlay["/opq"].mode == 0o700 and overlay["/tofile"].type == "file"


@needs_root("an overlay mount")
def test_merge_view_matches_a_kernel_overlay_mount(tmp_path: Path) -> None:
    layers = _layers(tmp_path, "overlay")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "-o", "ro,lowerdir=" + ":".join(map(str, layers)),
                    "overlay", str(mnt)], check=True)
    try:
        mounted = tree_snapshot(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert diff_trees(merge_view(layers), mounted) == []


def test_snapshot_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(".")
    (tmp_path / "out").symlink_to("/etc")
    assert sorted(tree_snapshot(tmp_path)) == ["/", "/loop", "/out"]
    assert os.path.isdir(tmp_path / "out")


pytestmark = pytest.mark.filterwarnings("error")
