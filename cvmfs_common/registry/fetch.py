"""Fetch: blobs streamed and verified on the fly (size and sha256), resumed with ``Range``
after a dropped connection; to a path (renamed into place only when verified), a file
object, memory (configs) or a read-only stream (unpacking while downloading)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cvmfs_common.fsutil.atomic import replacing_file
from cvmfs_common.oci.digest import Digest
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.api import api_url, blob_digest, repository_scope
from cvmfs_common.registry.errors import DigestMismatch, RegistryError, RetriesExhausted
from cvmfs_common.registry.limits import DEFAULT_CHUNK
from cvmfs_common.registry.manifest import ResolvedImage, parse_config
from cvmfs_common.registry.transport import TRANSIENT_ERRORS, Authorizer, Transport
from cvmfs_common.registry.watchdog import Transfer

MAX_CONFIG_BYTES = 16 * 1024 * 1024


class Fetcher:
    def __init__(self, transport: Transport, auth: Authorizer, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.transport = transport
        self.auth = auth
        self.chunk_size = chunk_size

    def exists(self, ref: Reference, digest: "str | Digest", *, push_scope: bool = False) -> bool:
        """A HEAD for the blob (``push_scope``: with the token a push will use)."""
        d = blob_digest(ref, digest)
        resp = self.transport.send(ref, "HEAD", api_url(ref, "blobs", str(d)), auth=self.auth,
                                   scope=repository_scope(ref, push_scope))
        resp.close()
        if resp.status_code == 404:
            return False
        self.transport.raise_for_status(ref, resp, f"HEAD blob {d}")
        return True

    def iter_blob(self, ref: Reference, digest: "str | Digest", size: int | None = None, *,
                  verify: bool = True) -> Iterator[bytes]:
        """Yield the blob's bytes in chunks; raises DigestMismatch at the end if
        the content is wrong. Dropped connections resume with ``Range``.

        Consumers must treat what they got as tentative until the iterator is
        exhausted without error. ``verify=False`` leaves the digest to a consumer
        that hashes the bytes anyway (the publisher's unpacker): sizes are still
        checked, the sha256 is not computed twice.
        """
        d = blob_digest(ref, digest)
        with self.transport.watchdog.tracked(ref, f"blob {d} from {ref.registry}", blob=True) as t:
            yield from self._iter_blob(ref, d, size, verify, t)

    def _iter_blob(self, ref: Reference, d: Digest, size: int | None, verify: bool, t: Transfer) -> Iterator[bytes]:
        transport, retry = self.transport, self.transport.retry
        url = api_url(ref, "blobs", str(d))
        scope = repository_scope(ref)
        hasher = hashlib.sha256() if verify else None
        received = 0
        drops = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else {}
            resp = transport.send(ref, "GET", url, auth=self.auth, scope=scope, stream=True, headers=headers)
            try:
                if received and resp.status_code == 416:
                    break  # nothing after what we have: the size check below decides
                transport.raise_for_status(ref, resp, f"blob {d}")
                skip = 0
                if received:
                    if resp.status_code == 206:
                        start = _content_range_start(resp.headers.get("Content-Range", ""))
                        if start != received:
                            raise RegistryError(ref, f"blob {d}: asked for bytes {received}-, got Content-Range {resp.headers.get('Content-Range')!r}")
                    else:
                        skip = received  # server ignored Range: discard what we have
                try:
                    for chunk in transport.read_body(t, resp, self.chunk_size):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        received += len(chunk)
                        if size is not None and received > size:
                            raise DigestMismatch(ref, f"blob {d}: more than the expected {size} bytes")
                        if hasher is not None:
                            hasher.update(chunk)
                        yield chunk
                    t.raise_failure()  # the watchdog cut it: the end is not the blob's end
                except TRANSIENT_ERRORS as e:
                    t.raise_failure()
                    drops += 1
                    if drops >= retry.attempts:
                        raise RetriesExhausted(ref, f"blob {d}: connection dropped {drops} times, last: {e}") from e
                    transport.sleep(retry.delay(drops - 1))
                    continue
            finally:
                t.resp = None
                resp.close()
            if size is not None and received < size:
                # The body ended early without a protocol error (no Content-Length): resume.
                drops += 1
                if drops >= retry.attempts:
                    raise RetriesExhausted(ref, f"blob {d}: got {received} of {size} bytes after {drops} attempts")
                transport.sleep(retry.delay(drops - 1))
                continue
            break
        if size is not None and received != size:
            raise DigestMismatch(ref, f"blob {d}: got {received} bytes, expected {size}")
        if hasher is None:
            return
        actual = hasher.hexdigest()
        if actual != d.hex:
            raise DigestMismatch(ref, f"blob {d}: content has digest sha256:{actual}")

    def fetch_blob(self, ref: Reference, digest: "str | Digest", dest: "str | os.PathLike[str] | IO[bytes]",
                   size: int | None = None, *, tmp_dir: "str | os.PathLike[str] | None" = None) -> int:
        """Download a verified blob to ``dest`` (a path or a binary file object).

        For a path: written to a temp file (in ``tmp_dir`` or dest's directory),
        fsynced, renamed over ``dest`` only after size and digest check out; on
        any error the temp file is removed and ``dest`` is untouched. For a file
        object the bytes are written as they arrive (the caller discards it on
        error). Returns the number of bytes.
        """
        if hasattr(dest, "write"):
            n = 0
            for chunk in self.iter_blob(ref, digest, size):
                dest.write(chunk)  # type: ignore[union-attr]
                n += len(chunk)
            return n
        path = Path(os.fspath(dest))  # type: ignore[arg-type]
        n = 0
        with replacing_file(path, tmp_dir, ".partial") as f:
            for chunk in self.iter_blob(ref, digest, size):
                f.write(chunk)
                n += len(chunk)
        return n

    def get_blob_bytes(self, ref: Reference, digest: "str | Digest", size: int | None = None,
                       limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (config, thin-image JSON) in memory, verified."""
        if size is not None and size > limit:
            raise RegistryError(ref, f"blob {digest} is {size} bytes, over the {limit} limit")
        buf = bytearray()
        for chunk in self.iter_blob(ref, digest, size):
            buf += chunk
            if len(buf) > limit:
                raise RegistryError(ref, f"blob {digest} is over the {limit} byte limit")
        return bytes(buf)

    def fetch_config(self, image: ResolvedImage) -> tuple[bytes, dict]:
        """The image config blob (verified), raw and parsed."""
        data = self.get_blob_bytes(image.reference, image.config.digest, size=image.config.size, limit=MAX_CONFIG_BYTES)
        return data, parse_config(image.reference, image.config.digest, data)


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(m.group(1)) if m else None


class BlobStream(io.RawIOBase):
    """A read-only file object over :meth:`Fetcher.iter_blob`, for tarfile ``r|*`` while downloading.

    Call :meth:`finish` when done: it drains the rest and raises DigestMismatch if the blob
    was wrong -- only then is the result valid (with ``verify=False`` the caller checks the
    digest)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._eof = False
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        """Whole chunks as the download yields them when they fit (no copy)."""
        if size is None or size < 0:
            return self.readall()
        while not self._buf and not self._eof:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                self._eof = True
        if len(self._buf) <= size:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        self.bytes_read += len(out)
        return out

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._eof:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                self._eof = True  # the digest was verified by the generator
        if not self._buf:
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.bytes_read += n
        return n

    def finish(self) -> None:
        """Drain what the consumer did not read and verify the digest."""
        while self.readinto(bytearray(DEFAULT_CHUNK)):
            pass

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()
        super().close()
