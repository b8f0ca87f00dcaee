"""publisher.write.grafts and ChainMerger(grafts=True) without a CernVM-FS: the graft file's
text, which files are never grafted, and a graft made earlier in the transaction travelling
with its file (tests/cvmfs/test_batch.py publishes grafts on a real stratum 0)."""
from __future__ import annotations

import os
from pathlib import Path

from publisher.write.chains import ChainMerger
from publisher.write.grafts import GRAFT_PREFIX, GraftInfo, graft_info, write_graft

from tests.fixtures.marks import requires_root


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


@requires_root
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
