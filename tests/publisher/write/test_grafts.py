"""publisher.write.grafts and ChainMerger(grafts=True) without a CernVM-FS: the graft file's
text, which files are never grafted, and a graft made earlier in the transaction travelling
with its file (tests/cvmfs/test_batch.py publishes grafts on a real stratum 0)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from cvmfs_common.oci.digest import sha256_of
from cvmfs_common.repo.paths import RepositoryLayout
from publisher.write.chains import ChainMerger, build_chain
from publisher.write.grafts import GRAFT_PREFIX, GraftCache, GraftInfo, graft_info, write_graft



def test_graft_text_one_chunk_and_chunked() -> None:
    assert GraftInfo(6, (("5798f7f4", 0, 6),)).text() == "size=6\nchecksum=5798f7f4\n"
    text = GraftInfo(10, (("aaaa", 0, 4), ("bbbb", 4, 6))).text()
    assert text == "size=10\nchecksum=0000\nchunk_offsets=0,4\nchunk_checksums=aaaa,bbbb\n"


def test_a_file_cvmfs_did_not_publish_is_not_grafted(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello\n")
    assert graft_info(str(f), 6) is None  # no user.chunk_list: not published
    try:  # a file that carries the name as an xattr of its own (an image can) is not trusted
        os.setxattr(f, "user.chunk_list", b"hash,offset,size\nabc,0,6\n")
        os.setxattr(f, "user.compression", b"zlib")
    except OSError:
        return  # no user xattrs on this file system
    assert graft_info(str(f), 6) is None


def test_write_graft_makes_an_empty_file_and_its_graft_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_graft(fd, "big", GraftInfo(6, (("abc", 0, 6),)))
    finally:
        os.close(fd)
    assert (tmp_path / "big").read_bytes() == b""
    assert (tmp_path / (GRAFT_PREFIX + "big")).read_text() == "size=6\nchecksum=abc\n"


def test_merge_carries_grafts_with_their_files_only(tmp_path: Path) -> None:
    lower, upper, out = tmp_path / "lower", tmp_path / "upper", tmp_path / "out"
    (lower / "d").mkdir(parents=True)
    upper.mkdir()
    for name in ("kept", "replaced", "deleted"):  # grafts made earlier in the transaction
        (lower / "d" / name).write_bytes(b"")
        (lower / "d" / (GRAFT_PREFIX + name)).write_text(f"size=1\nchecksum={name}\n")
    (upper / "d").mkdir()
    (upper / "d" / "replaced").write_text("new content\n")
    (upper / "d" / ".wh.deleted").write_bytes(b"")
    ChainMerger(grafts=True).merge(out, lower, upper)
    names = sorted(os.listdir(out / "d"))
    assert names == [GRAFT_PREFIX + "kept", "kept", "replaced"], names
    assert os.stat(out / "d" / (GRAFT_PREFIX + "kept")).st_ino == os.stat(lower / "d" / (GRAFT_PREFIX + "kept")).st_ino
    assert os.stat(out / "d" / "kept").st_ino == os.stat(lower / "d" / "kept").st_ino  # with its file
    assert (out / "d" / "replaced").read_text() == "new content\n"
    # and a flat copy of that chain takes the graft along as well
    flat = tmp_path / "flat"
    ChainMerger(grafts=True).merge(flat, None, out)
    assert sorted(os.listdir(flat / "d")) == names


def test_grafts_linked_with_their_graft_files_take_no_lstat(tmp_path: Path, monkeypatch) -> None:
    """A tree of grafts made earlier in the transaction (a flat copy of a chain) is linked by the
    names readdir gave: one lstat per entry through the union was most of the merge's own time.
    After a graft is copied (EMLINK) its other names still go to that copy, with their graft files."""
    import errno

    from publisher.write import chains

    src, out = tmp_path / "src", tmp_path / "out"
    (src / "d").mkdir(parents=True)
    for name in ("a", "b"):
        (src / "d" / name).write_bytes(b"")
        (src / "d" / (GRAFT_PREFIX + name)).write_text(f"size=1\nchecksum={name}\n")
    os.link(src / "d" / "a", src / "d" / "a2")  # a hard-link group of grafts, each with its graft file
    os.link(src / "d" / (GRAFT_PREFIX + "a"), src / "d" / (GRAFT_PREFIX + "a2"))
    lstats = []
    real_st = chains._Source.st
    monkeypatch.setattr(chains._Source, "st", property(lambda self: lstats.append(self.name) or real_st.fget(self)))
    ChainMerger(grafts=True).merge(out, None, src)
    assert lstats == []
    assert os.stat(out / "d" / "a").st_ino == os.stat(src / "d" / "a").st_ino
    assert os.stat(out / "d" / (GRAFT_PREFIX + "b")).st_ino == os.stat(src / "d" / (GRAFT_PREFIX + "b")).st_ino

    def link(src_name, dst_name, **kw):  # the group's inode is full: the first name is copied
        if src_name in ("a", "a2") and kw.get("src_dir_fd") is not None and dst_name in ("a", "a2"):
            if not getattr(link, "failed", False):
                link.failed = True
                raise OSError(errno.EMLINK, "Too many links")
        os.link(src_name, dst_name, **kw)

    ChainMerger(grafts=True, link=link).merge(tmp_path / "out2", None, src)
    d = tmp_path / "out2" / "d"
    assert os.stat(d / "a").st_ino == os.stat(d / "a2").st_ino != os.stat(src / "d" / "a").st_ino
    assert sorted(os.listdir(d)) == sorted(n for f in ("a", "a2", "b") for n in (f, GRAFT_PREFIX + f))


def test_graft_cache_asks_once_per_file_until_cleared(tmp_path: Path) -> None:
    asked: list[str] = []

    def lookup(path: str, size: int) -> GraftInfo:
        asked.append(os.path.basename(path))
        return GraftInfo(size, (("h-" + os.path.basename(path), 0, size),))

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"aa")
    b.write_bytes(b"bbb")
    cache = GraftCache(lookup)
    for _ in range(3):  # three chains on the same parent
        assert cache.info(str(a), os.lstat(a)) == GraftInfo(2, (("h-a", 0, 2),))
        assert cache.info(str(b), os.lstat(b)) == GraftInfo(3, (("h-b", 0, 3),))
    assert asked == ["a", "b"]
    a.write_bytes(b"changed")  # another file state is another question
    assert cache.info(str(a), os.lstat(a)).size == 7
    cache.clear()  # a new transaction: the union was remounted
    cache.info(str(b), os.lstat(b))
    assert asked == ["a", "b", "a", "b"]


def test_published_empty_files_symlinks_and_fifos_are_written_anew(tmp_path: Path) -> None:
    """A link would copy the published entry up with its dirs, and publish would rewrite the
    parent tree's catalog (tests/cvmfs/test_known_base.py); these have no content to hash."""
    parent, layer, out = tmp_path / "parent", tmp_path / "layer", tmp_path / "out"
    (parent / "d").mkdir(parents=True)
    layer.mkdir()
    (parent / "d" / "empty").write_bytes(b"")
    os.link(parent / "d" / "empty", parent / "d" / "empty2")
    os.chmod(parent / "d" / "empty", 0o4711)
    os.symlink("empty", parent / "d" / "sym")
    os.mkfifo(parent / "d" / "fifo", 0o640)
    ChainMerger(grafts=True).merge(out, parent, layer)
    for name in ("empty", "empty2", "sym", "fifo"):
        assert os.lstat(out / "d" / name).st_ino != os.lstat(parent / "d" / name).st_ino, name
    assert os.lstat(out / "d" / "empty").st_ino == os.lstat(out / "d" / "empty2").st_ino  # the group stays
    assert stat.S_IMODE(os.lstat(out / "d" / "empty").st_mode) == 0o4711
    assert os.readlink(out / "d" / "sym") == "empty" and stat.S_ISFIFO(os.lstat(out / "d" / "fifo").st_mode)
    # without grafts (the local backend) they are linked as before
    ChainMerger(grafts=False).merge(tmp_path / "plain", parent, layer)
    assert os.lstat(tmp_path / "plain/d/empty").st_ino == os.lstat(parent / "d" / "empty").st_ino


def test_chains_on_one_parent_ask_for_its_files_once(tmp_path: Path) -> None:
    asked: list[str] = []

    def lookup(path: str, size: int) -> GraftInfo:
        asked.append(os.path.basename(path))
        return GraftInfo(size, (("abc", 0, size),))

    parent = tmp_path / "parent"
    (parent / "d").mkdir(parents=True)
    (parent / "d" / "f").write_text("published\n")
    cache = GraftCache(lookup)
    for i in range(3):
        layer = tmp_path / f"layer{i}"
        layer.mkdir()
        (layer / f"own{i}").write_text("x\n")
        ChainMerger(grafts=True, graft_cache=cache).merge(tmp_path / f"chain{i}", parent, layer)
        assert (tmp_path / f"chain{i}" / "d" / (GRAFT_PREFIX + "f")).read_text() == "size=10\nchecksum=abc\n"
    assert sorted(asked) == ["f", "own0", "own1", "own2"], asked


def test_chains_on_one_published_parent_link_the_grafts_the_first_wrote(tmp_path: Path) -> None:
    """A round's second batch: each chain on the published base links, file and graft file,
    the grafts the first chain of the transaction wrote, as the first batch links its parent's."""
    def lookup(path: str, size: int) -> GraftInfo:
        return GraftInfo(size, (("abc", 0, size),))

    lay = RepositoryLayout(tmp_path / "repo")
    parent = tmp_path / "parent"  # stands for a published chain
    (parent / "d").mkdir(parents=True)
    for name in ("f", "g", "moved"):
        (parent / "d" / name).write_text(f"published {name}\n")
    os.link(parent / "d" / "f", parent / "d" / "f2")  # a hard-link group of the parent
    cache = GraftCache(lookup)
    chains = []
    for i in range(3):
        layer = tmp_path / f"layer{i}"
        (layer / "d").mkdir(parents=True)
        (layer / "d" / f"own{i}").write_text("x\n")
        path, stats = build_chain(lay, sha256_of(f"chain{i}".encode()), parent, layer,
                                  ChainMerger(grafts=True, graft_cache=cache), durable=False)
        assert stats is not None and stats.grafted == 5 and stats.linked == 0, stats
        chains.append(path / "d")
    for name in ("f", "f2", "g", "moved"):
        for item in (name, GRAFT_PREFIX + name):
            inodes = {os.lstat(c / item).st_ino for c in chains}
            assert len(inodes) == 1, (item, inodes)  # one graft, linked by the later chains
    assert os.lstat(chains[0] / "f").st_ino != os.lstat(chains[0] / "f2").st_ino  # the group stays apart
    assert (chains[2] / (GRAFT_PREFIX + "f")).read_text() == "size=12\nchecksum=abc\n"

    # A graft that is not what one here would be (its mode changed) is written anew, as is one
    # whose tree went away.
    os.chmod(chains[0] / "g", 0o600)
    os.unlink(chains[0] / "moved")
    layer = tmp_path / "layer3"
    (layer / "d").mkdir(parents=True)
    path, _ = build_chain(lay, sha256_of(b"chain3"), parent, layer, ChainMerger(grafts=True, graft_cache=cache),
                          durable=False)
    assert os.lstat(path / "d/f").st_ino == os.lstat(chains[0] / "f").st_ino
    assert os.lstat(path / "d/g").st_ino != os.lstat(chains[0] / "g").st_ino
    assert stat.S_IMODE(os.lstat(path / "d/g").st_mode) == stat.S_IMODE(os.lstat(parent / "d/g").st_mode)
    assert os.lstat(path / "d/moved").st_ino != os.lstat(chains[1] / "moved").st_ino
    assert sorted(os.listdir(path / "d")) == sorted(n for f in ("f", "f2", "g", "moved") for n in (f, GRAFT_PREFIX + f))

    cache.clear()  # a new transaction: those grafts are published, no longer grafts
    layer = tmp_path / "layer4"
    (layer / "d").mkdir(parents=True)
    path, _ = build_chain(lay, sha256_of(b"chain4"), parent, layer, ChainMerger(grafts=True, graft_cache=cache),
                          durable=False)
    assert os.lstat(path / "d/f").st_ino != os.lstat(chains[0] / "f").st_ino
