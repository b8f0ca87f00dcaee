"""DUCC layer dirs without a chain: served when they hold no whiteouts (docs/DESIGN.md#ducc, #whiteouts).

DUCC writes `layers.json` without a `whiteouts` field and keeps a layer's whiteouts raw
(`.wh.NAME`, `.wh..wh..opq`: `cvmfs_server ingest` keeps them). Such a dir is no overlay
lower as it is: the marker files would show and the deletions would not happen. With the
chain (`.chains/<id>`) gone -- DUCC builds flats by merging layer dirs now, and a reader can
no longer count on `.chains` -- the layer's dir is looked at once:

* no `.wh.` name anywhere in it: it is exactly the layer's diff in overlay form (an empty
  set of whiteouts), served as a lower like a layer the publisher marked `none`;
* a `.wh.` name: containerd pulls and applies that layer normally (its whiteouts become
  overlay whiteouts in a local snapshot); the layers above may still be served.

The look is a walk of the layer's names (on CernVM-FS: the layer's catalog, no file data),
stopping at the first `.wh.` name. It runs on a thread of its own per repository, never
on the bounded prober (a big layer must not make the repository look hung); the request
that starts a walk waits for it at most the stat timeout, and the layer is pulled normally
while its walk is not done. Verdicts are kept in memory for the process's life (one walk per layer
per snapshotter start).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cvmfs_common.oci.digest import next_chain_id
from cvmfs_common.repo.lookup import LayerPresence

from ..layer_source import LayerRequest

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
MAX_ENTRIES = 5_000_000  # a walk past this says "unknown" (the layer is pulled)
CACHE_SIZE = 65_536  # layer verdicts kept (a few hundred bytes each)


class Verdict(str, Enum):
    CLEAN = "clean"  # no whiteouts: an overlay lower as it is
    RAW = "raw"  # raw whiteouts: pull it
    UNKNOWN = "unknown"  # unreadable or too big to look at: pull it


@dataclass(frozen=True)
class Scan:
    verdict: Verdict
    entries: int
    seconds: float
    why: str = ""


def scan_layer(layerfs: Path, max_entries: int = MAX_ENTRIES) -> Scan:
    """Walk `layerfs` (names only) until the first `.wh.` name."""
    started = time.monotonic()
    entries = 0
    stack = [os.fspath(layerfs)]
    try:
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    entries += 1
                    if e.name.startswith(WHITEOUT_PREFIX):
                        return Scan(Verdict.RAW, entries, time.monotonic() - started, e.path)
                    if entries > max_entries:
                        return Scan(Verdict.UNKNOWN, entries, time.monotonic() - started, "too many entries")
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
    except OSError as e:
        return Scan(Verdict.UNKNOWN, entries, time.monotonic() - started, str(e))
    return Scan(Verdict.CLEAN, entries, time.monotonic() - started)


class WhiteoutScanner:
    """One repository's walks, on a daemon thread of their own, verdicts cached."""

    def __init__(self, name: str, wait: float, max_entries: int = MAX_ENTRIES) -> None:
        self.wait = wait
        self.max_entries = max_entries
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: OrderedDict[str, Scan] = OrderedDict()
        self._running: dict[str, Future] = {}
        threading.Thread(target=self._work, name=f"wh-scan-{name}", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            digest, layerfs, future = job
            try:
                result = scan_layer(layerfs, self.max_entries)
            except Exception as e:  # noqa: BLE001 - this layer is pulled; the thread lives on
                result = Scan(Verdict.UNKNOWN, 0, 0.0, f"{type(e).__name__}: {e}")
            with self._lock:
                self._running.pop(digest, None)
                self._done[digest] = result
                while len(self._done) > CACHE_SIZE:
                    self._done.popitem(last=False)
            log.info("DUCC layer %s: %s (%d entries looked at in %.2fs)%s", digest, result.verdict.value,
                     result.entries, result.seconds, f": {result.why}" if result.why else "")
            future.set_result(result)

    def verdict(self, digest: str, layerfs: Path) -> Scan | None:
        """The layer's verdict; None when its walk did not end within `wait` (it goes on), or
        is under way for an earlier request."""
        with self._lock:
            done = self._done.get(digest)
            if done is not None:
                self._done.move_to_end(digest)
                return done
            if digest in self._running:
                return None  # the request that started the walk waited; later ones do not
            future = self._running[digest] = Future()
            self._jobs.put((digest, layerfs, future))
        try:
            return future.result(timeout=self.wait)
        except FutureTimeout:
            log.info("DUCC layer %s: still being looked at after %.1fs; pulled normally this time", digest,
                     self.wait)
            return None

    def close(self) -> None:
        self._jobs.put(None)


class DuccLayers:
    """Serves chain-less DUCC layer dirs that hold no whiteouts (see the module doc)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._scanners: dict[Path, WhiteoutScanner] = {}
        self._lock = threading.Lock()

    def _scanner(self, root: Path) -> WhiteoutScanner:
        with self._lock:
            s = self._scanners.get(root)
            if s is None:
                s = self._scanners[root] = WhiteoutScanner(root.name, self.wait)
            return s

    def serves(self, root: Path, req: LayerRequest, presence: LayerPresence) -> bool:
        """May `presence.layerfs` (a DUCC layer: whiteouts unknown) stand in for `req`?"""
        meta = presence.metadata
        if meta is None or meta.whiteouts is not None or meta.parent_chain is not None:
            return False  # not DUCC's, or the publisher's own rules decided already
        if req.has_parent and req.parent_chain_id is None:
            return False
        if next_chain_id(req.parent_chain_id, meta.diff_digest) != req.chain_id:
            return False
        scan = self._scanner(root).verdict(presence.digest, presence.layerfs)
        return scan is not None and scan.verdict == Verdict.CLEAN

    def close(self) -> None:
        with self._lock:
            for s in self._scanners.values():
                s.close()


__all__ = ["DuccLayers", "Scan", "Verdict", "WhiteoutScanner", "scan_layer"]
