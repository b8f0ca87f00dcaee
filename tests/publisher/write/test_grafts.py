"""publisher.write.grafts and ChainMerger(grafts=True) without a CernVM-FS: the graft file's
text, which files are never grafted, and a graft made earlier in the transaction travelling
with its file (tests/cvmfs/test_batch.py publishes grafts on a real stratum 0)."""
from __future__ import annotations

import os
from pathlib import Path

from publisher.write.chains import ChainMerger
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
    assert (out / "d" / "replaced").read_text() == "new content\n"
    # and a flat copy of that chain takes the graft along as well
    flat = tmp_path / "flat"
    ChainMerger(grafts=True).merge(flat, None, out)
    assert sorted(os.listdir(flat / "d")) == names


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
