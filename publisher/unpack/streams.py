"""Streaming readers for a layer blob: hashing tees and decompression.

The blob may still be downloading while it is read, so nothing here seeks and nothing
holds more than a few chunks in memory. Pipeline (each stage a file-like with `read`):

    raw blob -> HashingReader (compressed digest) -> decompressor -> HashingReader (diffID)
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Protocol

CHUNK = 1 << 20  # 1 MiB: big reads keep the per-call Python overhead negligible

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class StreamError(Exception):
    """The byte stream itself is broken (bad compression, trailing garbage, too large)."""


class StreamTooLarge(StreamError):
    pass


class SourceFailed(Exception):
    """Reading the blob itself failed (network, disk): carries the original exception, so
    the caller sees that one and not a layer error (it may want to retry)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class SourceReader:
    """Marks failures of the underlying blob stream as SourceFailed."""

    def __init__(self, inner: Readable) -> None:
        self._inner = inner

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._inner.read(size)
        except Exception as exc:
            raise SourceFailed(exc) from exc


class HashingReader:
    """Passes reads through, hashing and counting every byte; enforces an optional size cap
    (a decompression bomb stops here instead of filling the disk)."""

    def __init__(self, inner: Readable, algorithm: str = "sha256", limit: int | None = None) -> None:
        self._inner = inner
        self._hash = hashlib.new(algorithm)
        self._limit = limit
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(CHUNK if size is None or size < 0 else size)
        if data:
            self.size += len(data)
            if self._limit is not None and self.size > self._limit:
                raise StreamTooLarge(f"stream exceeds the limit of {self._limit} bytes")
            self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Prepend:
    """Gives back bytes already read for sniffing before reading on from the source."""

    def __init__(self, head: bytes, inner: Readable) -> None:
        self._head = head
        self._inner = inner

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            if size is None or size < 0 or size >= len(self._head):
                head, self._head = self._head, b""
                return head
            head, self._head = self._head[:size], self._head[size:]
            return head
        return self._inner.read(size)


# gzip inflaters with zlib's decompressobj API, fastest first: on a 544 MB layer blob
# zlib-ng (the `fast-gzip` extra) took 0.93 s of CPU, python-isal 0.98 s, zlib 1.68 s
# (bench/ingest_bench.py --inflate). All release the GIL and check every member's
# CRC32 and length; the limits on the output (StreamTooLarge) sit above them.
INFLATERS = {"zlib-ng": "zlib_ng.zlib_ng", "isal": "isal.isal_zlib", "zlib": "zlib"}
INFLATE_ENV = "CVMFS_PUBLISHER_INFLATE"  # force one (benchmarks; ruling a library out)


@functools.lru_cache(maxsize=None)
def inflate_module(name: str | None = None) -> ModuleType:
    """The inflater called `name`, or the fastest installed one (zlib at worst)."""
    if name is not None:
        if name not in INFLATERS:
            raise StreamError(f"unknown inflater {name!r} (${INFLATE_ENV}): one of {', '.join(INFLATERS)}")
        try:
            return importlib.import_module(INFLATERS[name])
        except ImportError:
            raise StreamError(f"inflater {name!r} (${INFLATE_ENV}) is not installed") from None
    for module in INFLATERS.values():
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise AssertionError("zlib is always there")


class _GzipReader:
    """Multi-member gzip (pigz, concatenated streams) with bounded output per call.

    Trailing zero padding after the last member is accepted (gzip(1) does the same);
    any other trailing data is an error, as in Go's gzip reader that containerd uses."""

    def __init__(self, source: Readable, inflater: ModuleType | None = None) -> None:
        self._src = source
        self._z = inflater or inflate_module(os.environ.get(INFLATE_ENV) or None)
        self._d = self._z.decompressobj(wbits=31)
        self._pending = b""        # compressed input not yet given to zlib
        self._eof = False

    def _refill(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return self._src.read(CHUNK)

    def read(self, size: int = -1, /) -> bytes:
        want = CHUNK if size is None or size < 0 else size
        while not self._eof:
            if self._d.eof:
                self._next_member()
                continue
            data = self._d.unconsumed_tail or self._refill()
            if not data:
                raise StreamError("gzip stream ends before its end marker (truncated blob)")
            try:
                out = self._d.decompress(data, want)
            except self._z.error as exc:
                raise StreamError(f"invalid gzip data: {exc}") from None
            if self._d.eof and self._d.unused_data:
                self._pending = self._d.unused_data
            if out:
                return out
        return b""

    def _next_member(self) -> None:
        data = self._refill()
        while data and not data.strip(b"\0"):
            data = self._src.read(CHUNK)  # zero padding: keep reading (and hashing) to EOF
        if not data:
            self._eof = True
            return
        if not data.startswith(GZIP_MAGIC[: len(data)]):
            raise StreamError("trailing data after the gzip stream")
        self._pending = data
        self._d = self._z.decompressobj(wbits=31)


def _zstd_reader(source: Readable) -> Readable:
    try:
        import zstandard
    except ImportError:  # optional dependency: say exactly what to install
        raise StreamError("zstd-compressed layer but the 'zstandard' module is not installed "
                          "(pip install 'cvmfs-images[zstd]')") from None
    reader = zstandard.ZstdDecompressor().stream_reader(
        source, read_size=CHUNK, read_across_frames=True, closefd=False)

    class _Wrapped:
        def read(self, size: int = -1, /) -> bytes:
            try:
                return reader.read(CHUNK if size is None or size < 0 else size)
            except zstandard.ZstdError as exc:
                raise StreamError(f"invalid zstd data: {exc}") from None

    return _Wrapped()


class TarSource:
    """The uncompressed tar stream as tarfile reads it (read, tell, forward-only seek: what
    tarfile's own stream wrapper offers), over the chunks a ReadAhead hands over, plus a
    zero-copy path for file data: `pieces(n)` yields views into those chunks, written to
    the file as they are. tarfile's stream mode would copy every byte four times through
    fresh MiB-sized buffers (its 64 KiB refills joined and re-sliced per read, the file
    object's buffer, ours), and on this kind of VM the page faults of those buffers cost
    more system time than writing the files.

    Go's archive/tar (Docker, containerd) accepts a tar that stops right after the last
    member's data, without block padding or end-of-archive blocks (umoci 0.4 writes such
    layers); tarfile wants the padding. Once a member's data is consumed the caller says
    `member_data_ends(pos)`; if EOF then falls between that position and the next block
    boundary, zeros are supplied up to the boundary. They sit above the diffID hashing,
    so the digest stays that of the real bytes."""

    BLOCK = 512

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk      # b"" at the end
        self._buf = memoryview(b"")
        self._pos = 0
        self._data_end = -1
        self._eof = False

    def member_data_ends(self, pos: int) -> None:
        self._data_end = pos

    def tell(self) -> int:
        return self._pos

    def _fill(self) -> bool:
        """Make `_buf` non-empty; False at the end of the stream."""
        if self._buf:
            return True
        if self._eof:
            return False
        data = self._next_chunk()
        if data:
            self._buf = memoryview(data)
            return True
        missing = -self._pos % self.BLOCK
        # EOF in the padding block right after the data (part of the padding may be there)
        if missing and self._pos + missing - self.BLOCK < self._data_end <= self._pos:
            self._data_end = self._pos + missing
            self._buf = memoryview(bytes(missing))
            return True
        self._eof = True
        return False

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next `size` bytes (fewer at the end of the stream) as views into the chunks;
        each view is valid until the next call into this object."""
        while size > 0 and self._fill():
            piece = self._buf[:size]
            self._buf = self._buf[len(piece):]
            self._pos += len(piece)
            size -= len(piece)
            yield piece

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            size = CHUNK
        return b"".join(self.pieces(size))

    def seek(self, pos: int, whence: int = 0, /) -> int:
        if whence != 0 or pos < self._pos:
            raise StreamError("the tar stream cannot seek backwards")
        for _ in self.pieces(pos - self._pos):
            pass
        return self._pos

    def seekable(self) -> bool:
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
_malloc_tuned = False


def keep_freed_buffers() -> None:
    """Let glibc reuse freed MiB-sized buffers instead of returning them to the kernel.

    By default it serves such buffers from fresh mmaps or trims the heap right after they
    are freed, so every chunk of a layer is page-faulted in anew: on this kind of VM that
    was ~5 faults per KiB unpacked and more system time than the file writes. Buffers up
    to 4 MiB now come from the heap, which keeps up to 8 MiB free per arena (bounded: at
    most `ReadAhead.depth` chunks are in flight per layer). Process-wide and idempotent;
    a no-op where there is no glibc."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 8 << 20)


class ReadAhead:
    """Runs `source` (download, digest, decompression, diffID) in a thread, ahead of the
    consumer, through a bounded queue: zlib, hashlib and the file writes all release the
    GIL, so inflating overlaps with writing files. At most `depth` chunks are in flight.
    close() stops the thread and joins it; the source must not be touched before that."""

    _EOF = object()

    def __init__(self, source: Readable, depth: int = 8) -> None:
        keep_freed_buffers()
        self._source = source
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._pump, name="layer-read-ahead", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        item: object
        try:
            while not self._stop.is_set():
                item = self._source.read(CHUNK)
                if not item:
                    break
                self._put(item)
            item = self._EOF
        except BaseException as exc:  # handed to the consumer, raised there
            item = exc
        self._put(item)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def chunk(self) -> bytes:
        """The next chunk as the source produced it; b"" at the end."""
        if self._buf:
            out, self._buf = self._buf.tobytes(), memoryview(b"")
            return out
        if self._done:
            return b""
        item = self._queue.get()
        if item is self._EOF:
            self._done = True
            return b""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert isinstance(item, bytes)
        return item

    def read(self, size: int = -1, /) -> bytes:
        if not self._buf:
            item = self.chunk()
            if not item:
                return b""
            if size is None or size < 0 or size >= len(item):
                return item
            self._buf = memoryview(item)
        n = len(self._buf) if size is None or size < 0 else min(size, len(self._buf))
        out, self._buf = self._buf[:n].tobytes(), self._buf[n:]
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def sniff_compression(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes of a blob."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def media_type_compression(media_type: str | None) -> str | None:
    """Compression a layer media type declares; None when it says nothing we know.

    Raises StreamError for layer types we cannot unpack (encrypted, other codecs)."""
    if not media_type:
        return None
    base = media_type.split(";")[0].strip().lower()
    if "encrypted" in base:
        raise StreamError(f"encrypted layers are not supported ({media_type})")
    if base.endswith(("+gzip", ".tar.gzip", ".tar.gz")):
        return "gzip"
    if base.endswith(("+zstd", ".tar.zstd")):
        return "zstd"
    if base.endswith((".tar", "+tar")) or base.endswith("layer.v1.tar"):
        return "none"
    if base.endswith(("+bzip2", "+xz", "+lz4")):
        raise StreamError(f"unsupported layer compression ({media_type})")
    return None


_OPENERS: dict[str, Callable[[Readable], Readable]] = {
    "gzip": _GzipReader,
    "zstd": _zstd_reader,
    "none": lambda source: source,
}


def open_decompressed(source: Readable, media_type: str | None = None) -> tuple[Readable, str]:
    """Sniff the compression of `source` and return (reader of the tar stream, compression).

    The magic bytes decide (containerd does the same); a media type that declares a
    compression the bytes do not have is an error, since the blob is then not what its
    manifest says."""
    declared = media_type_compression(media_type)
    head = source.read(CHUNK)
    found = sniff_compression(head)
    if declared in ("gzip", "zstd") and found != declared:
        raise StreamError(f"media type {media_type} declares {declared} but the blob is {found}")
    return _OPENERS[found](_Prepend(head, source)), found


def drain(reader: Readable) -> int:
    """Read `reader` to its end (so its hash covers everything); return the byte count."""
    total = 0
    while chunk := reader.read(CHUNK):
        total += len(chunk)
    return total


def drain_expect_zeros(reader: Readable) -> int:
    """Like drain, but return the number of NON-zero bytes seen (for trailing-data checks)."""
    nonzero = 0
    while chunk := reader.read(CHUNK):
        nonzero += len(chunk) - chunk.count(0)
    return nonzero

