"""The transfer watchdog: one thread per client that looks at every body being read and ends
the ones past a bound (minimum rate over a window, a blob's time limit, the caller's deadline,
an abort) by shutting their socket -- a server trickling one byte per read timeout cannot hold
the reader, who then raises TransferTooSlow / DeadlineExceeded / Aborted."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import requests

from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import Aborted, DeadlineExceeded, RegistryError, TransferTooSlow
from cvmfs_common.registry.limits import Deadline, TransferLimits

log = logging.getLogger(__name__)


class Transfer:
    """One body being read, as the watchdog sees it (counters updated by the reader)."""

    def __init__(self, ref: Reference, what: str, limits: TransferLimits, blob: bool) -> None:
        self.ref, self.what, self.limits, self.blob = ref, what, limits, blob
        self.started = self.window_start = time.monotonic()
        self.received = self.window_received = 0
        self.resp: requests.Response | None = None
        self.failure: RegistryError | None = None

    def check(self, now: float, deadline: Deadline | None, aborted: str | None) -> RegistryError | None:
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
        # Expected: the reader ended and closed the connection meanwhile; nothing to wake.
        log.debug("registry watchdog: no socket to shut down for %s", resp.url, exc_info=True)


class Watchdog:
    """The transfers in flight, the caller's deadline and abort; the thread starts with the
    first transfer. Thread-safe."""

    def __init__(self, limits: TransferLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._transfers: set[Transfer] = set()  # guarded by _lock
        self._deadline: Deadline | None = None
        self._aborted: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()

    def set_deadline(self, when: float | None, what: str = "the deadline") -> None:
        """Every transfer in flight or started until the next call must end before
        ``when`` (time.monotonic()); None lifts it. ``what`` names it in errors."""
        self._deadline = None if when is None else (when, what)

    def abort(self, reason: str) -> None:
        """End every transfer in flight now and refuse new requests (Aborted)."""
        self._aborted = reason
        self.check_transfers()

    def check_now(self, ref: Reference, what: str) -> None:
        """Before a request: the abort and the deadline (a body being read is the thread's)."""
        if self._aborted is not None:
            raise Aborted(ref, f"{what}: {self._aborted}")
        deadline = self._deadline
        if deadline is not None and time.monotonic() >= deadline[0]:
            raise DeadlineExceeded(ref, f"{what}: {deadline[1]} passed")

    def check_transfers(self) -> None:
        now, deadline, aborted = time.monotonic(), self._deadline, self._aborted
        with self._lock:
            transfers = list(self._transfers)
        for t in transfers:
            if t.failure is None:
                error = t.check(now, deadline, aborted)
                if error is not None:
                    t.fail(error)

    def _watch(self) -> None:
        while not self._closed.wait(self.limits.check_interval):
            try:
                self.check_transfers()
            except (OSError, RegistryError, requests.RequestException):
                # a transfer ending under the check: it is the reader's to report
                log.debug("registry watchdog: a transfer ended while being checked", exc_info=True)
            except Exception:  # noqa: BLE001 - the watchdog must outlive anything, but say what it met
                log.warning("registry watchdog: checking the transfers failed (it goes on)", exc_info=True)

    @contextlib.contextmanager
    def tracked(self, ref: Reference, what: str, *, blob: bool = False) -> Iterator[Transfer]:
        """A transfer the thread watches while the block runs."""
        t = Transfer(ref, what, self.limits, blob)
        with self._lock:
            self._transfers.add(t)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="registry-watchdog", daemon=True)
                self._thread.start()
        try:
            yield t
        finally:
            with self._lock:
                self._transfers.discard(t)
