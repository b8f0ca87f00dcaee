"""Writes a layer's data back to disk while the layer is still being unpacked.

Left alone, the kernel starts writing dirty pages back only after 30 s or once a tenth
of the memory is dirty, so a layer of a few hundred MB sits in the page cache until the
ingest's final syncfs and the disk idles meanwhile: on the 544 MB bench layer that sync
was 0.5-0.9 s of a ~2.2 s ingest. Here a thread calls syncfs(2) on the layer's file
system each time `step` more bytes were written, so the disk works in parallel with the
unpacking and the final syncfs finds little left. The thread only waits in the kernel
(the flusher kworkers do the writing); errors it meets are raised in the unpacking
thread, since the final syncfs opens its own fd and would not see them (errseq).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable

STEP = 64 << 20   # bytes written between two syncfs calls


@functools.lru_cache(maxsize=1)
def _libc_syncfs() -> Callable[[int], int] | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "syncfs", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int]
    return fn


def syncfs_fd(fd: int) -> None:
    """syncfs(2) on an open fd; OSError on failure (e.g. EIO from the writeback)."""
    fn = _libc_syncfs()
    if fn is None:      # not Linux/glibc: sync(2) does at least as much
        os.sync()
        return
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class EarlyWriteback:
    """`written(total)` as the bytes written below `dir_fd` grow; `close()` at the end (it
    stops and joins the thread and raises what a syncfs raised). The fd is dup'ed: one
    open file description for all calls, so a writeback error since it was opened is
    reported."""

    def __init__(self, dir_fd: int, step: int | None = None,
                 sync: Callable[[int], None] | None = None) -> None:
        self._step = STEP if step is None else step
        self._sync = syncfs_fd if sync is None else sync
        self._next = self._step
        self._fd = os.dup(dir_fd)
        self._kick = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="layer-writeback", daemon=True)
        self._thread.start()

    def written(self, total: int) -> None:
        if total >= self._next:
            self._next = total + self._step
            self.check()
            self._kick.set()    # coalesces with a syncfs still running

    def check(self) -> None:
        """Raise (once) what the thread met."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stop:
                return
            try:
                self._sync(self._fd)
            except BaseException as exc:  # handed to the unpacking thread
                self._error = exc
                return

    def close(self, *, raise_error: bool = True) -> None:
        """Stop the thread (a syncfs in progress finishes first), release the fd, raise
        the thread's error if any (not when an error is already propagating)."""
        if self._fd < 0:
            return
        self._stop = True
        self._kick.set()
        self._thread.join()
        os.close(self._fd)
        self._fd = -1
        if raise_error:
            self.check()
