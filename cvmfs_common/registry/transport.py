"""The HTTP side of the registry client: retry policy, transfer bounds and the watchdog's view of a
body, transient failures, Retry-After, and the file object over a streamed blob."""

from __future__ import annotations

import io
import random
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions

from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import Aborted, DeadlineExceeded, RegistryError, TransferTooSlow


# urllib3 drops a partly filled read when the connection breaks, so a resume
# restarts at most one chunk back: keep chunks moderate.
DEFAULT_CHUNK = 256 * 1024


# configuration ---------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Backoff: delay = min(max_delay, base_delay * 2**attempt) (+ up to 10% jitter)."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        d = min(self.max_delay, self.base_delay * (2**attempt))
        return d + random.uniform(0, d / 10)


@dataclass(frozen=True)
class TransferLimits:
    """Bounds on what a registry may make us wait for or hold in memory (the read
    timeout alone does not bound a server sending one byte per timeout)."""

    min_rate: int = 10 * 1024  # bytes/s every body must average over each rate_window; 0: off
    rate_window: float = 60.0
    blob_timeout: float = 0.0  # seconds for one blob, resumes included; 0: off
    max_token_bytes: int = 1024 * 1024  # a token response (JWTs are a few kB)
    max_error_bytes: int = 64 * 1024  # an error body (only its message is used)
    max_tag_list_bytes: int = 32 * 1024 * 1024  # one page of a tag list
    check_interval: float = 0.5  # how often the watchdog looks at the transfers


class _Transfer:
    """One body being read, as the watchdog sees it (counters updated by the reader)."""

    def __init__(self, ref: Reference, what: str, limits: TransferLimits, blob: bool) -> None:
        self.ref, self.what, self.limits, self.blob = ref, what, limits, blob
        self.started = self.window_start = time.monotonic()
        self.received = self.window_received = 0
        self.resp: requests.Response | None = None
        self.failure: RegistryError | None = None

    def check(self, now: float, deadline: "tuple[float, str] | None", aborted: str | None) -> RegistryError | None:
        lim = self.limits
        if aborted is not None:
            return Aborted(self.ref, f"{self.what}: {aborted} (after {self.received} bytes)")
        if deadline is not None and now >= deadline[0]:
            return DeadlineExceeded(self.ref, f"{self.what}: {deadline[1]} passed after {self.received} bytes")
        if self.blob and lim.blob_timeout and now - self.started >= lim.blob_timeout:
            return DeadlineExceeded(self.ref, f"{self.what}: not complete after {lim.blob_timeout:.0f} s "
                                              f"({self.received} bytes)")
        if lim.min_rate and now - self.window_start >= lim.rate_window:
            got = self.received - self.window_received
            if got < lim.min_rate * (now - self.window_start):
                return TransferTooSlow(self.ref, f"{self.what}: {got} bytes in the last {now - self.window_start:.0f} s, "
                                                 f"under the minimum of {lim.min_rate / 1024:g} KiB/s "
                                                 f"({self.received} bytes in all)")
            self.window_start, self.window_received = now, self.received
        return None

    def fail(self, error: RegistryError) -> None:
        if self.failure is None:
            self.failure = error
            if self.resp is not None:
                _shutdown_socket(self.resp)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def _shutdown_socket(resp: requests.Response) -> None:
    """Wake a reader blocked on this response's socket (close() would not: the
    blocked recv keeps the fd). The plain socket call, also for TLS sockets."""
    raw = resp.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket.shutdown: it unwraps under the reader
    except (OSError, TypeError, ValueError):
        pass


_TRANSIENT_EXC = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
)


_TIMEOUT_EXC = (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError)


def _is_transient_status(code: int) -> bool:
    return code == 429 or 500 <= code <= 599


def _retry_after_seconds(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value).timestamp()
        return max(0.0, when - time.time())
    except (TypeError, ValueError):
        return None


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(m.group(1)) if m else None


class BlobStream(io.RawIOBase):
    """File object over :meth:`RegistryClient.iter_blob` (see ``open_blob``)."""

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
