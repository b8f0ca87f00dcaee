"""publisher.unpack.streams' gzip inflaters: the fast one (zlib-ng, the `fast-gzip` extra) and
the zlib fallback give the same bytes and digests, and refuse the same broken or hostile
layers."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import sys
import zlib
from pathlib import Path

import pytest

from publisher.unpack import streams
from publisher.unpack.layererrors import DigestMismatchError, HostileLayerError, LayerError
from publisher.unpack.streams import INFLATE_ENV, StreamError, inflate_module
from publisher.unpack.tarsafety import Limits
from publisher.unpack.unpack import unpack_layer

from tests.publisher.layertar import blob, blob_of_tar, reg, tar_bytes

INSTALLED = [name for name, module in streams.INFLATERS.items()
             if importlib.util.find_spec(module.split(".")[0]) is not None]


@pytest.fixture(params=["zlib", "zlib-ng", *(["isal"] if "isal" in INSTALLED else [])])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Forces the publisher's inflater, as $CVMFS_PUBLISHER_INFLATE does for a process."""
    if request.param not in INSTALLED:  # scripts/setup.sh installs the fast-gzip extra
        pytest.skip(f"{request.param} is not installed (pip install 'cvmfs-images[fast-gzip]')")
    monkeypatch.setenv(INFLATE_ENV, request.param)
    return request.param


@pytest.fixture
def no_fast_inflaters(monkeypatch: pytest.MonkeyPatch):
    """A host without isal and zlib-ng (None in sys.modules makes their import fail)."""
    monkeypatch.setitem(sys.modules, "isal", None)
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    monkeypatch.setitem(sys.modules, "zlib_ng", None)
    monkeypatch.setitem(sys.modules, "zlib_ng.zlib_ng", None)
    monkeypatch.delenv(INFLATE_ENV, raising=False)
    inflate_module.cache_clear()
    yield
    inflate_module.cache_clear()


def test_without_the_fast_libraries_zlib_is_used(no_fast_inflaters: None) -> None:
    assert inflate_module() is zlib
    data = os.urandom(300_000) + bytes(2 << 20)
    reader = streams._GzipReader(io.BytesIO(gzip.compress(data)))
    assert reader._z is zlib
    assert b"".join(iter(lambda: reader.read(1 << 16), b"")) == data


def test_the_fast_library_is_preferred_when_installed() -> None:
    if "zlib-ng" not in INSTALLED:
        pytest.skip("zlib-ng is not installed (pip install 'cvmfs-images[fast-gzip]')")
    assert inflate_module().__name__ == "zlib_ng.zlib_ng"


def test_an_unknown_or_missing_inflater_is_a_clear_error(no_fast_inflaters: None) -> None:
    with pytest.raises(StreamError, match="unknown inflater 'gunzip'"):
        inflate_module("gunzip")
    with pytest.raises(StreamError, match="'zlib-ng' .* is not installed"):
        inflate_module("zlib-ng")


def test_bounded_output_and_multi_member(inflater: str) -> None:
    data = os.urandom(200_000) + bytes(3 << 20)
    second = b"second member " * 1000
    reader = streams._GzipReader(io.BytesIO(gzip.compress(data) + gzip.compress(second) + bytes(700)))
    assert reader._z.__name__ == streams.INFLATERS[inflater]
    out = []
    while chunk := reader.read(1 << 16):
        assert len(chunk) <= 1 << 16  # never more than asked: the bomb limits count every chunk
        out.append(chunk)
    assert b"".join(out) == data + second


@pytest.mark.parametrize("damage", ["crc", "length", "body", "truncated", "trailing"])
def test_broken_gzip_is_refused(inflater: str, damage: str) -> None:
    data = bytearray(gzip.compress(os.urandom(20_000) + b"text " * 10_000))
    if damage == "crc":
        data[-6] ^= 0xFF
    elif damage == "length":
        data[-2] ^= 0xFF
    elif damage == "body":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        del data[-100:]
    else:
        data += b"junk"
    reader = streams._GzipReader(io.BytesIO(bytes(data)))
    with pytest.raises(StreamError):
        while reader.read(1 << 16):
            pass


# ----------------------------------------------------------------- through the unpacker

def test_same_digests_and_files(inflater: str, work: Path) -> None:
    payload = os.urandom(1 << 20)
    b = blob([reg("a", payload), reg("b", b"b" * 100_000)])
    r = unpack_layer(b.stream(), work, digest=b.digest, diff_id=b.diff_id)
    assert r.diff_id == b.diff_id
    assert (work / "a").read_bytes() == payload


def test_decompression_bomb_stops_at_the_limit(inflater: str, repo: Path, work: Path) -> None:
    b = blob_of_tar(tar_bytes([reg("a")], raw_tail=bytes(64 << 20)))  # 64 MiB of zeros: ~64 KiB gzip
    with pytest.raises(HostileLayerError, match="limit"):
        unpack_layer(b.stream(), work, digest=b.digest, limits=Limits(max_total_bytes=1 << 20))
    assert not work.exists()
    assert list((repo / ".tmp").iterdir()) == []


def test_corrupt_blob_reports_the_digest(inflater: str, repo: Path, work: Path) -> None:
    b = blob([reg("a", os.urandom(50_000)), reg("b", b"b")])
    data = bytearray(b.data)
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(DigestMismatchError, match="blob digest"):
        unpack_layer(io.BytesIO(bytes(data)), work, digest=b.digest)
    assert list((repo / ".tmp").iterdir()) == []


def test_multi_member_layer(inflater: str, work: Path) -> None:
    tar = tar_bytes([reg("a", b"1"), reg("b", b"2")])
    data = gzip.compress(tar[:700]) + gzip.compress(tar[700:])
    r = unpack_layer(io.BytesIO(data), work, digest="sha256:" + hashlib.sha256(data).hexdigest())
    assert r.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert (work / "b").read_bytes() == b"2"


def test_unknown_inflater_is_a_layer_error(repo: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = blob([reg("a")])
    monkeypatch.setenv(INFLATE_ENV, "gunzip")
    with pytest.raises(LayerError, match="unknown inflater"):
        unpack_layer(b.stream(), work, digest=b.digest)
    assert not work.exists()
