"""Through the real stack: an image built with umoci, unpacked layer by layer by us and
mounted with kernel overlayfs, must look exactly like `umoci unpack` of the same image."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.publisher.treeview import diff_trees, merge_view, tree_snapshot
from publisher.unpack.unpack import unpack_layer

from tests.publisher.layertar import ACL_ACCESS, ACL_DEFAULT, CAP_NET_BIND

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mount, chown, mknod)"),
    pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed"),
]


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def _repack(image: str, bundle: Path) -> None:
    _run("umoci", "repack", "--image", image, bundle)
    shutil.rmtree(bundle)
    _run("umoci", "unpack", "--image", image, bundle)


def _populate_base(rootfs: Path) -> None:
    for d in ("etc", "usr/bin", "usr/lib", "home/alice", "srv/data", "opt/app/conf", "var/cache/x"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (rootfs / "etc/motd").write_text("hello\n")
    (rootfs / "etc/empty").touch()
    (rootfs / "usr/bin/tool").write_bytes(os.urandom(200_000))
    os.chmod(rootfs / "usr/bin/tool", 0o4755)
    (rootfs / "usr/bin/ping").write_bytes(b"\x7fELF ping")
    os.setxattr(rootfs / "usr/bin/ping", "security.capability", CAP_NET_BIND)
    os.link(rootfs / "usr/bin/tool", rootfs / "usr/bin/tool-alias")
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "usr/lib/libx.so.1").write_bytes(b"lib")
    (rootfs / "usr/lib/libx.so").symlink_to("libx.so.1")
    os.chown(rootfs / "home/alice", 1000, 1000)
    os.chmod(rootfs / "home/alice", 0o700)
    (rootfs / "home/alice/.profile").write_text("export A=1\n")
    os.chown(rootfs / "home/alice/.profile", 1000, 1000)
    os.setxattr(rootfs / "home/alice/.profile", "user.comment", b"mine")
    os.chmod(rootfs / "srv", 0o2755)
    os.setxattr(rootfs / "srv/data", "system.posix_acl_access", ACL_ACCESS)
    os.setxattr(rootfs / "srv/data", "system.posix_acl_default", ACL_DEFAULT)
    os.chmod(rootfs / "srv/data", 0o755)
    (rootfs / "tmp").mkdir(mode=0o1777)
    os.chmod(rootfs / "tmp", 0o1777)
    (rootfs / "opt/app/conf/a.conf").write_text("a")
    (rootfs / "opt/app/conf/b.conf").write_text("b")
    (rootfs / "var/cache/x/blob").write_bytes(bytes(3 << 20))


def _change(rootfs: Path) -> None:
    (rootfs / "etc/motd").unlink()                           # whiteout of a file
    shutil.rmtree(rootfs / "var/cache/x")                    # whiteout of a directory
    os.chmod(rootfs / "etc/passwd", 0o600)                   # metadata-only change
    os.chown(rootfs / "etc/empty", 12, 34)
    (rootfs / "usr/lib/libx.so").unlink()
    (rootfs / "usr/lib/libx.so").symlink_to("libx.so.2")     # changed symlink
    (rootfs / "usr/lib/libx.so.2").write_bytes(b"lib2")
    (rootfs / "home/alice/new").write_text("new file in a 0700 dir")
    os.chown(rootfs / "home/alice/new", 1000, 1000)
    (rootfs / "etc/motd.d").mkdir()
    (rootfs / "etc/motd.d/10-hi").write_text("hi")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An OCI layout with four layers: base, changes, an opaque insert, a whiteout insert."""
    top = tmp_path_factory.mktemp("umoci")
    layout, image = top / "oci", f"{top / 'oci'}:t"
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", image)
    bundle = top / "bundle"
    _run("umoci", "unpack", "--image", image, bundle)
    _populate_base(bundle / "rootfs")
    _repack(image, bundle)
    _change(bundle / "rootfs")
    _repack(image, bundle)
    replacement = top / "conf-new"
    replacement.mkdir()
    (replacement / "only.conf").write_text("only")
    _run("umoci", "insert", "--image", image, "--opaque", replacement, "/opt/app/conf")
    _run("umoci", "insert", "--image", image, "--whiteout", "/usr/bin/tool-alias")
    return layout, image


def _layers(layout: Path) -> list[tuple[str, str, str]]:
    """(media type, digest, diffID) per layer, bottom first."""
    index = json.loads((layout / "index.json").read_text())
    manifest = _blob_json(layout, index["manifests"][0]["digest"])
    config = _blob_json(layout, manifest["config"]["digest"])
    return [(layer["mediaType"], layer["digest"], diff)
            for layer, diff in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)]


def _blob_json(layout: Path, digest: str) -> dict:
    return json.loads(_blob_path(layout, digest).read_text())


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _unpack_all(layout: Path, dest: Path, whiteouts: str) -> list[Path]:
    dest.mkdir()
    dirs: list[Path] = []
    for i, (media_type, digest, diff_id) in enumerate(_layers(layout)):
        work = dest / f"layer{i}"
        with _blob_path(layout, digest).open("rb") as blob:
            result = unpack_layer(blob, work, digest=digest, diff_id=diff_id,
                                  media_type=media_type, whiteouts=whiteouts,
                                  lowers=list(reversed(dirs)))
        assert result.skipped == ()
        dirs.append(work)
    return list(reversed(dirs))   # topmost first, as lowerdir= wants


def test_overlay_mount_of_our_layers_equals_umoci_unpack(image: tuple[Path, str], tmp_path: Path) -> None:
    layout, ref = image
    reference = tmp_path / "umoci-bundle"
    _run("umoci", "unpack", "--image", ref, reference)
    expected = tree_snapshot(reference / "rootfs")
    assert "/etc/motd" not in expected and "/opt/app/conf/a.conf" not in expected  # sanity

    layers = _unpack_all(layout, tmp_path / "ours", "overlay")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mount", "-t", "overlay", "-o", "ro,lowerdir=" + ":".join(map(str, layers)), "overlay", mnt)
    try:
        mounted = tree_snapshot(mnt)
    finally:
        _run("umount", mnt)
    assert diff_trees(mounted, expected) == []
    assert diff_trees(merge_view(layers), expected) == []


def test_raw_layers_merge_to_the_same_view(image: tuple[Path, str], tmp_path: Path) -> None:
    layout, ref = image
    reference = tmp_path / "umoci-bundle"
    _run("umoci", "unpack", "--image", ref, reference)
    raw = _unpack_all(layout, tmp_path / "raw", "raw")
    assert diff_trees(merge_view(raw), tree_snapshot(reference / "rootfs")) == []


def test_reference_tree_is_rich(image: tuple[Path, str], tmp_path: Path) -> None:
    """Guards the comparison above against comparing two nearly empty trees."""
    layout, ref = image
    _run("umoci", "unpack", "--image", ref, tmp_path / "b")
    snap = tree_snapshot(tmp_path / "b" / "rootfs")
    assert len(_layers(layout)) == 4
    assert snap["/usr/bin/ping"].xattr("security.capability") == CAP_NET_BIND
    assert snap["/srv/data"].xattr("system.posix_acl_default") == ACL_DEFAULT
    assert snap["/usr/bin/tool"].mode == 0o4755 and snap["/home/alice"].uid == 1000
    assert "/usr/bin/tool-alias" not in snap and "/var/cache/x" not in snap
    assert sorted(p for p in snap if p.startswith("/opt/app/conf/")) == ["/opt/app/conf/only.conf"]
