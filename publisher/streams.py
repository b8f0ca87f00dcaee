"""Streaming readers for a layer blob: hashing tees and decompression.

The blob may still be downloading while it is read, so nothing here seeks and nothing
holds more than a few chunks in memory. Pipeline (each stage a file-like with `read`):

    raw blob -> HashingReader (compressed digest) -> decompressor -> HashingReader (diffID)
"""
from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Callable
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


class _GzipReader:
    """Multi-member gzip (pigz, concatenated streams) with bounded output per call.

    Trailing zero padding after the last member is accepted (gzip(1) does the same);
    any other trailing data is an error, as in Go's gzip reader that containerd uses."""

    def __init__(self, source: Readable) -> None:
        self._src = source
        self._d = zlib.decompressobj(wbits=31)
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
            except zlib.error as exc:
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
        self._d = zlib.decompressobj(wbits=31)


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


class TarEndPadding:
    """Go's archive/tar (Docker, containerd) accepts a tar that stops right after the last
    member's data, without block padding or end-of-archive blocks (umoci 0.4 writes such
    layers); tarfile wants the padding. Once the caller has consumed a member's data it
    calls `member_data_ends(pos)`; if EOF then falls between that position and the next
    block boundary, zeros are supplied up to the boundary. They sit above the diffID
    hashing, so the digest stays that of the real bytes."""

    BLOCK = 512

    def __init__(self, inner: Readable) -> None:
        self._inner = inner
        self._pos = 0
        self._data_end = -1

    def member_data_ends(self, pos: int) -> None:
        self._data_end = pos

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        if data:
            self._pos += len(data)
            return data
        missing = -self._pos % self.BLOCK
        # EOF in the padding block right after the data (part of the padding may be there)
        if missing and self._pos + missing - self.BLOCK < self._data_end <= self._pos:
            missing = min(missing, CHUNK if size is None or size < 0 else size)
            self._pos += missing
            self._data_end = self._pos
            return bytes(missing)
        return b""


class ReadAhead:
    """Runs `source` (download, digest, decompression, diffID) in a thread, ahead of the
    consumer, through a bounded queue: zlib, hashlib and the file writes all release the
    GIL, so inflating overlaps with writing files. At most `depth` chunks are in flight.
    close() stops the thread and joins it; the source must not be touched before that."""

    _EOF = object()

    def __init__(self, source: Readable, depth: int = 8) -> None:
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

    def read(self, size: int = -1, /) -> bytes:
        if not self._buf:
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

