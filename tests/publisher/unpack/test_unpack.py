"""publisher.unpack: a layer blob becomes a layer dir, exactly and safely.

Tests that need root (owners, whiteout device nodes, trusted and security xattrs) are marked
one by one; the hostile-member, bomb, limit and digest tests run as any user."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from cvmfs_common.fsutil.fdtree import remove_tree
from publisher.unpack.layererrors import DigestMismatchError, HostileLayerError, LayerError, short_member
from publisher.unpack.tarsafety import Limits
from tests.publisher.treeview import tree_snapshot
from publisher.unpack.unpack import unpack_layer

from tests.fixtures.marks import requires_root
from tests.publisher.layertar import (ACL_ACCESS, ACL_DEFAULT, CAP_NET_BIND, MTIME, blob, blob_of_tar, dir_, hard,
    header_only, node, reg, sym, tar_bytes)



def unpack(b, work, **kw):
    return unpack_layer(b.stream(), work, digest=b.digest, diff_id=b.diff_id, **kw)


# ------------------------------------------------------------------------- a faithful tree

@requires_root
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_tree_metadata_is_kept(work: Path, compression: str) -> None:
    b = blob([
        dir_("./", mode=0o755),
        dir_("etc", mode=0o755, mtime=MTIME - 100),
        reg("etc/passwd", b"root:x:0:0\n", mode=0o644),
        reg("etc/shadow", b"secret", mode=0o640, uid=0, gid=42),
        dir_("home"),
        dir_("home/alice", mode=0o700, uid=1000, gid=1000, mtime=MTIME - 5),
        reg("home/alice/notes", b"hi", uid=1000, gid=1000, xattrs={"user.tag": b"blue"}),
        dir_("tmp", mode=0o1777),
        dir_("usr"), dir_("usr/bin"),
        reg("usr/bin/sudo", b"\x7fELF", mode=0o4755),
        reg("usr/bin/wall", b"\x7fELF", mode=0o2755, gid=5),
        reg("usr/bin/ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": CAP_NET_BIND}),
        reg("usr/bin/suidcap", b"\x7fELF", mode=0o4711, uid=7,
            xattrs={"security.capability": CAP_NET_BIND}),
        sym("usr/bin/vi", "vim.basic", uid=3, gid=4),
        sym("etc/localtime", "/usr/share/zoneinfo/UTC"),
        hard("usr/bin/sudoedit", "usr/bin/sudo"),
        reg("empty"),
        dir_("srv", mode=0o2755, gid=50, xattrs={"system.posix_acl_access": ACL_ACCESS,
                                                 "system.posix_acl_default": ACL_DEFAULT}),
        reg("srv/acl-file", b"x", mode=0o755, xattrs={"system.posix_acl_access": ACL_ACCESS}),
    ], compression)
    r = unpack(b, work)
    snap = tree_snapshot(work)

    assert r.compression == compression
    assert (r.digest, r.diff_id) == (b.digest, b.diff_id)
    assert (r.diff_size, r.compressed_size) == (len(b.tar), len(b.data))
    assert r.whiteouts == "none" and r.skipped == () and r.implicit_parents == ()
    assert not r.depends_on_parent_chain
    assert (r.counts.files, r.counts.dirs, r.counts.symlinks, r.counts.hardlinks) == (9, 8, 2, 1)

    assert snap["/etc/shadow"].mode == 0o640 and snap["/etc/shadow"].gid == 42
    assert snap["/home/alice"].mode == 0o700 and snap["/home/alice"].uid == 1000
    assert snap["/home/alice/notes"].xattr("user.tag") == b"blue"
    assert snap["/tmp"].mode == 0o1777
    assert snap["/usr/bin/sudo"].mode == 0o4755
    assert snap["/usr/bin/wall"].mode == 0o2755 and snap["/usr/bin/wall"].gid == 5
    assert snap["/usr/bin/ping"].xattr("security.capability") == CAP_NET_BIND
    # chown before xattrs/chmod: neither the capability nor setuid got cleared
    assert snap["/usr/bin/suidcap"].mode == 0o4711 and snap["/usr/bin/suidcap"].uid == 7
    assert snap["/usr/bin/suidcap"].xattr("security.capability") == CAP_NET_BIND
    vi = snap["/usr/bin/vi"]
    assert (vi.type, vi.target, vi.uid, vi.gid) == ("symlink", "vim.basic", 3, 4)
    assert snap["/etc/localtime"].target == "/usr/share/zoneinfo/UTC"
    assert os.stat(work / "usr/bin/sudo").st_ino == os.stat(work / "usr/bin/sudoedit").st_ino
    assert snap["/empty"].size == 0 and snap["/empty"].sha256 == hashlib.sha256(b"").hexdigest()
    assert snap["/etc/passwd"].sha256 == hashlib.sha256(b"root:x:0:0\n").hexdigest()
    assert snap["/srv"].mode == 0o2755 and snap["/srv"].gid == 50
    assert snap["/srv"].xattr("system.posix_acl_access") == ACL_ACCESS
    assert snap["/srv"].xattr("system.posix_acl_default") == ACL_DEFAULT
    assert snap["/srv/acl-file"].xattr("system.posix_acl_access") == ACL_ACCESS
    assert snap["/srv/acl-file"].mode == 0o755
    # mtimes, directories' ones set after their contents were created
    assert snap["/etc"].mtime_ns == (MTIME - 100) * 10**9
    assert snap["/home/alice"].mtime_ns == (MTIME - 5) * 10**9
    assert snap["/etc/passwd"].mtime_ns == MTIME * 10**9
    assert snap["/usr/bin/vi"].mtime_ns == MTIME * 10**9
    assert snap["/"].mtime_ns == MTIME * 10**9


def test_pax_times_keep_nanoseconds(work: Path) -> None:
    ti, data = reg("f", b"x")
    ti.pax_headers = {"mtime": "1700000000.123456789"}
    r = unpack(blob([(ti, data)]), work)
    assert os.lstat(work / "f").st_mtime_ns == 1_700_000_000_123_456_789
    assert r.counts.files == 1


def test_large_file_is_streamed_and_zero_runs_become_holes(work: Path) -> None:
    mib = 1 << 20
    payload = os.urandom(mib) + bytes(8 * mib) + b"tail"
    b = blob([reg("big", payload)])
    unpack(b, work)
    st = os.stat(work / "big")
    assert st.st_size == len(payload)
    assert (work / "big").read_bytes() == payload
    assert st.st_blocks * 512 < 4 * mib          # the 8 MiB of zeros take no space


def test_reads_a_trickling_non_seekable_stream(work: Path) -> None:
    """The blob may still be downloading: small reads, no seek/tell."""
    b = blob([dir_("d"), reg("d/f", os.urandom(300_000)), reg("d/g", b"g")])

    class Trickle:
        def __init__(self, data: bytes) -> None:
            self._data = memoryview(data)

        def read(self, n: int = -1) -> bytes:
            n = min(n if n >= 0 else 777, 777)
            out, self._data = bytes(self._data[:n]), self._data[n:]
            return out

    r = unpack_layer(Trickle(b.data), work, digest=b.digest, diff_id=b.diff_id)  # type: ignore[arg-type]
    assert r.counts.files == 2 and (work / "d/g").read_bytes() == b"g"


def test_later_duplicate_entries_win(work: Path) -> None:
    b = blob([
        reg("a", b"first"), reg("a", b"second"),
        dir_("b"), reg("b/inside"), reg("b", b"now a file"),
        reg("c", b"file"), dir_("c", mode=0o711),
        dir_("d", mode=0o700), dir_("d", mode=0o755),
    ])
    unpack(b, work)
    assert (work / "a").read_bytes() == b"second"
    assert (work / "b").read_bytes() == b"now a file"
    assert stat.S_IMODE(os.stat(work / "c").st_mode) == 0o711
    assert stat.S_IMODE(os.stat(work / "d").st_mode) == 0o755


def test_device_nodes_are_skipped_and_fifos_kept(work: Path) -> None:
    b = blob([dir_("dev"), node("dev/null", tarfile.CHRTYPE, 1, 3),
              node("dev/sda", tarfile.BLKTYPE, 8, 0), node("dev/fifo", tarfile.FIFOTYPE),
              reg("dev/keep", b"k")])
    r = unpack(b, work)
    assert sorted(os.listdir(work / "dev")) == ["fifo", "keep"]
    assert [(s.member, s.reason.split()[0]) for s in r.skipped] == [("dev/null", "character"), ("dev/sda", "block")]
    assert r.counts.skipped == 2 and r.counts.fifos == 1


@requires_root
def test_fifo_attributes_are_kept(work: Path) -> None:
    fifo = node("run/pipe", tarfile.FIFOTYPE)
    fifo[0].mode, fifo[0].uid, fifo[0].gid = 0o620, 7, 8
    b = blob([dir_("run"), fifo, hard("run/pipe-link", "run/pipe"),
              node("run/replaced", tarfile.FIFOTYPE), reg("run/replaced", b"now a file")])
    unpack(b, work)
    st = os.lstat(work / "run/pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620 and (st.st_uid, st.st_gid) == (7, 8)
    assert st.st_mtime_ns == fifo[0].mtime * 10**9
    assert os.lstat(work / "run/pipe-link").st_ino == st.st_ino
    assert (work / "run/replaced").read_bytes() == b"now a file"


def test_overlay_xattrs_from_the_tar_are_dropped(work: Path) -> None:
    b = blob([dir_("d", xattrs={"trusted.overlay.opaque": b"y", "user.ok": b"1"})])
    r = unpack(b, work)
    assert "trusted.overlay.opaque" not in os.listxattr(work / "d")
    assert os.getxattr(work / "d", "user.ok") == b"1"
    assert [s.reason for s in r.skipped] == ["xattr trusted.overlay.opaque not allowed"]


# ------------------------------------------------------------------------- whiteouts

WHITEOUT_LAYER = [
    dir_("etc"), reg("etc/.wh.motd"), dir_("var"), dir_("var/cache"),
    reg("var/cache/.wh..wh..opq"), reg("var/cache/new", b"n"),
    reg("opt/.wh.tool"),                                   # parent omitted
]


@requires_root
def test_overlay_whiteouts_are_converted(work: Path) -> None:
    r = unpack(blob(WHITEOUT_LAYER), work, whiteouts="overlay")
    st = os.lstat(work / "etc/motd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(work / "var/cache", "trusted.overlay.opaque") == b"y"
    assert not list(work.rglob(".wh.*"))
    assert (r.whiteouts, r.counts.whiteouts, r.counts.opaques) == ("overlay", 2, 1)
    assert r.implicit_parents == ("/opt",)


def test_raw_whiteouts_are_kept_as_files(work: Path) -> None:
    r = unpack(blob(WHITEOUT_LAYER), work, whiteouts="raw")
    assert (work / "etc/.wh.motd").is_file() and (work / "var/cache/.wh..wh..opq").is_file()
    assert (work / "opt/.wh.tool").is_file()
    assert not os.path.lexists(work / "etc/motd")
    assert "trusted.overlay.opaque" not in os.listxattr(work / "var/cache")
    assert (r.whiteouts, r.counts.whiteouts, r.counts.opaques) == ("raw", 2, 1)


def test_no_whiteouts_means_mode_none(work: Path) -> None:
    assert unpack(blob([reg("a")]), work, whiteouts="raw").whiteouts == "none"


@requires_root
def test_whiteout_never_deletes_this_layers_own_entries(work: Path) -> None:
    b = blob([reg("f", b"mine"), reg(".wh.f"), dir_("d"), reg("d/x"), reg(".wh.d")])
    unpack(b, work)
    assert (work / "f").read_bytes() == b"mine"
    assert (work / "d/x").exists()
    # the lower d is deleted, this layer's d stays: it must hide the lower one's contents
    assert os.getxattr(work / "d", "trusted.overlay.opaque") == b"y"


@requires_root
def test_directory_replacing_a_whiteout_is_opaque(work: Path) -> None:
    b = blob([reg(".wh.d"), dir_("d"), reg("d/x"), reg(".wh.e"), reg("e/y")])
    unpack(b, work)
    for d in ("d", "e"):
        assert stat.S_ISDIR(os.lstat(work / d).st_mode)
        assert os.getxattr(work / d, "trusted.overlay.opaque") == b"y"


def test_aufs_metadata_is_skipped(work: Path) -> None:
    r = unpack(blob([dir_(".wh..wh.plnk"), reg("a")]), work)
    assert os.listdir(work) == ["a"] and r.whiteouts == "none"


# ------------------------------------------------------------------------- omitted parents

def _lower_rootfs(root: Path) -> Path:
    (root / "opt/app").mkdir(parents=True)
    os.chown(root / "opt/app", 5, 6)
    os.chmod(root / "opt/app", 0o750)
    os.setxattr(root / "opt/app", "user.origin", b"lower")
    os.utime(root / "opt/app", ns=(1_000_000_000, 2_000_000_000))
    os.chmod(root / "opt", 0o711)
    (root / "lib").symlink_to("usr/lib")
    (root / "usr/lib").mkdir(parents=True)
    os.chmod(root / "usr/lib", 0o705)
    return root


@requires_root
def test_omitted_parents_copy_the_parent_chain(work: Path, tmp_path: Path) -> None:
    lower = _lower_rootfs(tmp_path / "chain")
    r = unpack(blob([reg("opt/app/bin/tool", b"t"), reg("new/dir/f")]), work, lowers=[lower])
    app = os.stat(work / "opt/app")
    assert (stat.S_IMODE(app.st_mode), app.st_uid, app.st_gid) == (0o750, 5, 6)
    assert os.getxattr(work / "opt/app", "user.origin") == b"lower"
    assert app.st_mtime_ns == 2_000_000_000
    assert stat.S_IMODE(os.stat(work / "opt").st_mode) == 0o711
    assert stat.S_IMODE(os.stat(work / "opt/app/bin").st_mode) == 0o755   # no lower has it
    assert stat.S_IMODE(os.stat(work / "new").st_mode) == 0o755
    assert r.implicit_parents == ("/new", "/new/dir", "/opt", "/opt/app", "/opt/app/bin")
    assert r.parents_from_lower == ("/opt", "/opt/app")
    assert r.depends_on_parent_chain


@requires_root
def test_explicit_entry_after_implicit_parent_wins(work: Path, tmp_path: Path) -> None:
    lower = _lower_rootfs(tmp_path / "chain")
    r = unpack(blob([reg("opt/app/f"), dir_("opt/app", mode=0o700)]), work, lowers=[lower])
    assert stat.S_IMODE(os.stat(work / "opt/app").st_mode) == 0o700
    assert "user.origin" not in os.listxattr(work / "opt/app")
    assert r.implicit_parents == ("/opt",)


@requires_root
def test_omitted_parents_without_lowers_are_root_0755(work: Path) -> None:
    r = unpack(blob([reg("a/b/c", uid=9)]), work)
    for d in ("a", "a/b"):
        st = os.stat(work / d)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert r.implicit_parents == ("/a", "/a/b") and r.parents_from_lower == ()


@requires_root
def test_parents_from_layer_dirs_honour_their_whiteouts(work: Path, tmp_path: Path) -> None:
    bottom, middle = tmp_path / "l1", tmp_path / "l2"
    for d, mode in ((bottom / "x", 0o701), (bottom / "y", 0o702), (bottom / "z/sub", 0o703)):
        d.mkdir(parents=True)
        os.chmod(d, mode)
    middle.mkdir()
    os.mknod(middle / "x", stat.S_IFCHR, 0)                     # overlay whiteout of x
    (middle / ".wh.y").touch()                                  # raw whiteout of y
    (middle / "z").mkdir()
    os.chmod(middle / "z", 0o704)
    os.setxattr(middle / "z", "trusted.overlay.opaque", b"y")   # hides z/sub
    r = unpack(blob([reg("x/f"), reg("y/f"), reg("z/sub/f")]), work, lowers=[middle, bottom])
    assert stat.S_IMODE(os.stat(work / "x").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(work / "y").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(work / "z").st_mode) == 0o704
    assert "trusted.overlay.opaque" not in os.listxattr(work / "z")   # never copied
    assert stat.S_IMODE(os.stat(work / "z/sub").st_mode) == 0o755
    assert r.parents_from_lower == ("/z",)


@requires_root
def test_symlinks_of_the_parent_chain_are_followed_inside_the_root(work: Path, tmp_path: Path) -> None:
    """As containerd's applier does (fs.RootPath): lib -> usr/lib in the chain."""
    lower = _lower_rootfs(tmp_path / "chain")
    r = unpack(blob([reg("lib/x/libfoo.so", b"so")]), work, lowers=[lower])
    assert (work / "usr/lib/x/libfoo.so").read_bytes() == b"so"
    assert not os.path.lexists(work / "lib")
    assert stat.S_IMODE(os.stat(work / "usr/lib").st_mode) == 0o705
    assert r.followed_lower_symlinks == ("/lib",) and r.depends_on_parent_chain


def test_root_takes_the_chain_root_unless_the_layer_has_one(work: Path, tmp_path: Path) -> None:
    lower = tmp_path / "chain"
    lower.mkdir()
    os.chmod(lower, 0o751)
    r = unpack(blob([reg("a")]), work, lowers=[lower])
    assert stat.S_IMODE(os.stat(work).st_mode) == 0o751
    assert r.implicit_parents == ("/",) and r.depends_on_parent_chain


@requires_root
def test_a_usual_chain_root_does_not_tie_the_layer(work: Path, tmp_path: Path) -> None:
    lower = tmp_path / "chain"
    lower.mkdir(mode=0o755)
    os.chmod(lower, 0o755)
    os.utime(lower, ns=(5, 7_000_000_000))
    r = unpack(blob([reg("a")]), work, lowers=[lower])
    assert r.implicit_parents == () and os.stat(work).st_mtime_ns == 7_000_000_000


def test_an_explicit_root_entry_wins(work: Path, tmp_path: Path) -> None:
    lower = tmp_path / "chain"
    lower.mkdir()
    os.chmod(lower, 0o700)
    r = unpack(blob([dir_(".", mode=0o755), reg("a")]), work, lowers=[lower])
    assert stat.S_IMODE(os.stat(work).st_mode) == 0o755 and r.implicit_parents == ()


# ------------------------------------------------------------------------- hostile layers

def _assert_rejected(repo: Path, work: Path, b, exc_type=HostileLayerError, *, member: str | None = None,
                     limits: Limits = Limits(), match: str | None = None) -> LayerError:
    with pytest.raises(exc_type, match=match) as info:
        unpack(b, work, limits=limits)
    assert not work.exists()
    assert list((repo / ".tmp").iterdir()) == []
    err = info.value
    assert err.layer == b.digest and b.digest in str(err)
    if member is not None:
        assert err.member == member and repr(short_member(member)) in str(err)
    return err


HOSTILE = {
    "dotdot": ([reg("../../../outside/pwned")], "../../../outside/pwned", "escapes"),
    "absolute": ([reg("/etc/pwned")], "/etc/pwned", "absolute"),
    "inner-dotdot": ([dir_("a"), reg("a/../../x")], "a/../../x", "escapes"),
    "symlink-abs-parent": ([sym("l", "/etc"), reg("l/passwd", b"pwned")], "l/passwd", "symlink"),
    "symlink-outside-dir": ([sym("l", "OUTSIDE/etc"), reg("l/passwd", b"pwned")], "l/passwd", "symlink"),
    "symlink-dotdot-parent": ([sym("l", ".."), reg("l/x")], "l/x", "symlink"),
    "symlink-dir-then-dir": ([sym("l", "/tmp"), dir_("l/sub")], "l/sub", "symlink"),
    "hardlink-absolute": ([hard("h", "/etc/passwd")], "h", "absolute"),
    "hardlink-dotdot": ([hard("h", "../../../outside/etc/passwd")], "h", "escapes"),
    "hardlink-through-symlink": ([sym("l", "OUTSIDE/etc"), hard("h", "l/passwd")], "h", "symlink"),
    "hardlink-to-later-member": ([hard("h", "later"), reg("later")], "h", "does not contain"),
    "hardlink-missing": ([hard("h", "nope/nothing")], "h", "does not contain"),
    "hardlink-to-dir": ([dir_("d"), hard("h", "d")], "h", "directory"),
    "whiteout-dotdot": ([reg("a/.wh...")], "a/.wh...", "whiteout"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused(case: str, repo: Path, work: Path, outside: Path) -> None:
    members, name, why = HOSTILE[case]
    fixed = []
    for ti, data in members:
        ti.linkname = ti.linkname.replace("OUTSIDE", str(outside))
        fixed.append((ti, data))
    _assert_rejected(repo, work, blob(fixed), member=name, match=why)


def test_huge_declared_size_is_refused_before_reading(repo: Path, work: Path) -> None:
    ti, _ = reg("huge")
    ti.size = 1 << 40
    ok, data = reg("ok", b"ok")
    tar = header_only(ok) + data.ljust(512, b"\0") + header_only(ti) + bytes(4096)
    _assert_rejected(repo, work, blob_of_tar(tar), member="huge", match="declared size")


def test_total_bytes_limit(repo: Path, work: Path) -> None:
    b = blob([reg(f"f{i}", bytes(400_000)) for i in range(4)])
    _assert_rejected(repo, work, b, limits=Limits(max_total_bytes=1_000_000), match="limit")


def test_decompression_bomb_stops_at_the_stream_limit(repo: Path, work: Path) -> None:
    b = blob_of_tar(tar_bytes([reg("a")], raw_tail=bytes(3 << 20)))
    _assert_rejected(repo, work, b, limits=Limits(max_total_bytes=1 << 20), match="limit")


def test_too_many_entries(repo: Path, work: Path) -> None:
    b = blob([reg(f"f{i}") for i in range(20)])
    _assert_rejected(repo, work, b, member="f10", limits=Limits(max_entries=10), match="entries")


def test_path_too_long(repo: Path, work: Path) -> None:
    name = "/".join(["d" * 50] * 30)
    _assert_rejected(repo, work, blob([reg(name)]), member=name, limits=Limits(max_member_name=1000))


def test_oversized_pax_header(repo: Path, work: Path) -> None:
    ti, data = reg("f")
    ti.pax_headers = {"comment": "x" * 300_000}
    _assert_rejected(repo, work, blob([(ti, data)]), limits=Limits(max_header_bytes=100_000),
                     match="extended header")


# ------------------------------------------------------------------------- digests & streams

def test_compressed_digest_mismatch(repo: Path, work: Path) -> None:
    b = blob([reg("a", b"a")])
    with pytest.raises(DigestMismatchError, match="blob digest"):
        unpack_layer(b.stream(), work, digest="sha256:" + "0" * 64)
    assert not work.exists()


def test_diff_id_mismatch(repo: Path, work: Path) -> None:
    b = blob([reg("a", b"a")])
    with pytest.raises(DigestMismatchError, match="diffID"):
        unpack_layer(b.stream(), work, digest=b.digest, diff_id="sha256:" + "1" * 64)
    assert not work.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_download_reports_the_digest(repo: Path, work: Path, damage: str) -> None:
    b = blob([reg("a", os.urandom(50_000)), reg("b", b"b")])
    data = bytearray(b.data)
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    with pytest.raises(DigestMismatchError, match="blob digest"):
        unpack_layer(io.BytesIO(bytes(data)), work, digest=b.digest)
    assert list((repo / ".tmp").iterdir()) == []


def test_garbage_after_the_archive_is_refused(repo: Path, work: Path) -> None:
    b = blob_of_tar(tar_bytes([reg("a")], raw_tail=b"\0" * 512 + b"garbage" + b"\0" * 505))
    _assert_rejected(repo, work, b, LayerError, match="after the last tar member")


def test_zero_padding_after_the_archive_is_fine(work: Path) -> None:
    b = blob_of_tar(tar_bytes([reg("a")], raw_tail=bytes(10240)))
    assert unpack(b, work).diff_size == len(b.tar)


def test_multi_member_gzip(work: Path) -> None:
    import gzip
    tar = tar_bytes([reg("a", b"1"), reg("b", b"2")])
    data = gzip.compress(tar[:700]) + gzip.compress(tar[700:])
    r = unpack_layer(io.BytesIO(data), work, digest="sha256:" + hashlib.sha256(data).hexdigest())
    assert r.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert (work / "b").read_bytes() == b"2"


def test_media_type_that_lies_is_refused(repo: Path, work: Path) -> None:
    b = blob([reg("a")], "none")
    with pytest.raises(LayerError, match="declares gzip"):
        unpack_layer(b.stream(), work, digest=b.digest,
                     media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    assert not work.exists()


def test_zstd_without_the_module_says_what_to_install(repo: Path, work: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    b = blob([reg("a")], "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(LayerError, match="zstandard"):
        unpack_layer(b.stream(), work, digest=b.digest)
    assert not work.exists()


def test_existing_work_dir_is_not_touched(work: Path) -> None:
    work.mkdir()
    (work / "precious").write_text("keep")
    b = blob([reg("a")])
    with pytest.raises(FileExistsError):
        unpack(b, work)
    assert (work / "precious").read_text() == "keep"


def test_invalid_digest_argument(work: Path) -> None:
    with pytest.raises(ValueError):
        unpack_layer(io.BytesIO(b""), work, digest="md5:abc")
    assert not work.exists()


# ------------------------------------------------------------------------- tar endings

def _cut_tar(members, keep_after_last_data: int) -> bytes:
    """A tar stopping `keep_after_last_data` bytes after its last member's data (Go's
    archive/tar and so containerd accept these; umoci 0.4 writes them)."""
    tar = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        last = tf.getmembers()[-1]
    return tar[:last.offset_data + last.size + keep_after_last_data]


@pytest.mark.parametrize("keep", [0, 100])
def test_missing_padding_and_end_blocks_are_accepted(work: Path, keep: int) -> None:
    b = blob_of_tar(_cut_tar([reg("a", b"1"), reg("b", b"xyz")], keep))
    r = unpack(b, work)
    assert (work / "b").read_bytes() == b"xyz" and r.diff_size == len(b.tar)


def test_missing_end_blocks_after_a_header_only_member(work: Path) -> None:
    tar = tar_bytes([reg("a", b"1"), dir_("d")])
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        end = tf.getmembers()[-1].offset_data
    unpack(blob_of_tar(tar[:end]), work)
    assert (work / "d").is_dir()


def test_file_data_cut_short_is_an_error(repo: Path, work: Path) -> None:
    b = blob_of_tar(_cut_tar([reg("a", b"1"), reg("b", b"x" * 1000)], 0)[:-10])
    _assert_rejected(repo, work, b, LayerError, match="unexpected end")


@requires_root
def test_symlink_xattrs_are_set_on_the_link_itself(work: Path) -> None:
    ti, data = sym("l", "/nonexistent/target")
    ti.pax_headers = {"SCHILY.xattr.trusted.note": "on-link"}
    unpack(blob([(ti, data)]), work)
    assert os.getxattr(work / "l", "trusted.note", follow_symlinks=False) == b"on-link"


def test_a_failing_download_propagates_unchanged(repo: Path, work: Path) -> None:
    b = blob([reg(f"f{i}", os.urandom(100_000)) for i in range(30)], "none")

    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 1_000_000:
                raise ConnectionResetError("peer went away")
            return super().read(n)

    with pytest.raises(ConnectionResetError):
        unpack_layer(Broken(b.data), work, digest=b.digest)
    assert list((repo / ".tmp").iterdir()) == []


def test_unpack_without_owners(work: Path) -> None:
    """What a normal user's unpack does (and root's with preserve_owners=False): the
    member's owner is not applied, the file is the caller's."""
    r = unpack(blob([reg("f", b"x", uid=123, gid=456)]), work, preserve_owners=False)
    st = os.stat(work / "f")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()) and r.counts.files == 1


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_written_by_gnu_tar(work: Path, tmp_path: Path, fmt: str) -> None:
    import shutil
    import subprocess
    if shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"tail")
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(src), "sparse"],
                   check=True)
    b = blob_of_tar(out.read_bytes())
    unpack(b, work)
    data = (work / "sparse").read_bytes()
    assert len(data) == (5 << 20) + 4 and data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:-4].count(0) == len(data) - 8


@requires_root
def test_parents_omitted_deeper_than_path_max_come_from_the_lowers(work: Path, tmp_path: Path) -> None:
    depth = 3000  # 6 000-byte paths: PATH_MAX is 4096
    lower = tmp_path / "chain"
    lower.mkdir()
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o755, dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.fchmod(fd, 0o711)  # the deepest directory: its mode must reach the layer
    finally:
        os.close(fd)
    name = "d/" * depth + "new.txt"
    try:
        r = unpack(blob([reg(name, b"n")]), work, lowers=[lower])
        assert len(r.implicit_parents) == depth and len(r.parents_from_lower) == depth
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(depth):
                sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = sub
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o711
            assert os.listdir(fd) == ["new.txt"]
        finally:
            os.close(fd)
    finally:  # pytest's own clean-up recurses
        remove_tree(lower)
        remove_tree(work)
