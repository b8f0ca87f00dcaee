"""What a repository has, answered within a bounded time.

A hung FUSE mount (an unreachable CVMFS server) blocks `stat` in the kernel, and a
Python thread stuck there cannot be cancelled. So every file-system question about a
repository runs on that repository's worker thread; the RPC waits at most `timeout`
seconds. A question that times out leaves its worker behind (it ends when the call
returns) and the next question gets a fresh worker: one hung entry costs one thread, not
the repository. The same question while it is still stuck fails at once; with MAX_STUCK
questions stuck (the whole mount hangs), the repository is "unavailable" and every
question fails at once until one returns. Metadata files are read only when regular and
without blocking (fsutil.bounded): a FIFO there is no answer, not a hang. Answers are
cached for a short time: containerd asks about the same layers for every container start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import queue
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from cvmfs_common.fsutil.bounded import read_regular
from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.published import PublishedFiles
from cvmfs_common.repo.lookup import LayerPresence, find_chain, find_layer, find_layer_by_diff_id
from cvmfs_common.repo.paths import CONFIG_JSON, INDEX_JSON, LayoutError, RepositoryLayout

from ..layer_source import SourceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


MAX_MANIFEST = 4 << 20  # bytes; the registry's own manifest limit
MAX_CONFIG = 16 << 20
MAX_STUCK = 3  # questions left stuck before the whole repository counts as not answering


def _small(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, or None when it is missing, unreadable, not a regular file
    (a FIFO would block the open) or over `limit`."""
    try:
        return read_regular(path, limit, follow_symlinks=True)
    except OSError:
        return None


class RepositoryUnavailable(SourceUnavailable):
    """The repository did not answer in time (or is still stuck on an earlier question)."""


@dataclass
class BoundedRepository:
    """One repository root with its prober thread and lookup cache."""

    root: Path
    timeout: float = 2.0
    cache_ttl: float = 5.0
    clock: Callable[[], float] = time.monotonic
    on_failure: Callable[[str], None] | None = None  # called with the root on a timeout
    _worker: "_Worker | None" = field(default=None, init=False, repr=False)
    _stuck: dict[Future, str] = field(default_factory=dict, init=False, repr=False)  # -> what it asked
    _cache: dict[tuple[str, str], tuple[float, object]] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.layout = RepositoryLayout(self.root)
        self._worker = _Worker(f"probe-{self.root.name}")

    @property
    def healthy(self) -> bool:
        with self._lock:
            return not self._still_stuck()

    def _still_stuck(self) -> dict[Future, str]:
        self._stuck = {f: what for f, what in self._stuck.items() if not f.done()}
        return self._stuck

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        with self._lock:
            stuck = self._still_stuck()
            if len(stuck) >= MAX_STUCK or what in stuck.values():
                self._report_failure()
                why = f"{what} is still stuck" if what in stuck.values() else f"{len(stuck)} lookups are still stuck"
                raise RepositoryUnavailable(f"{self.root} is not answering ({why})")
            if self._closed:
                raise RepositoryUnavailable(f"{self.root}: closed")
            if self._worker is None:
                try:
                    self._worker = _Worker(f"probe-{self.root.name}")
                except RuntimeError as e:  # no thread to be had (a task limit)
                    raise RepositoryUnavailable(f"{self.root}: no prober thread ({e})") from None
            worker = self._worker
            future: Future = Future()
            worker.jobs.put((future, fn))
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            if future.cancel():  # queued behind another question that is stuck: never ran
                self._report_failure()
                raise RepositoryUnavailable(f"{self.root} did not answer {what} within {self.timeout:g}s") from None
            with self._lock:
                self._stuck[future] = what
                if self._worker is worker:  # leave it to its stuck call; the next question gets a fresh one
                    worker.retire()
                    self._worker = None
            self._report_failure()
            log.warning("repository %s did not answer %s within %.1fs; falling back", self.root, what, self.timeout)
            raise RepositoryUnavailable(f"{self.root} did not answer {what} within {self.timeout:g}s") from None

    def _report_failure(self) -> None:
        if self.on_failure is not None:
            self.on_failure(str(self.root))

    def _cached(self, kind: str, key: str, fn: Callable[[], T]) -> T:
        now = self.clock()
        with self._lock:
            hit = self._cache.get((kind, key))
            if hit is not None and hit[0] > now:
                return hit[1]  # type: ignore[return-value]
        value = self._run(f"{kind} {key}", fn)
        with self._lock:
            if len(self._cache) > 10_000:  # bounded: drop expired entries
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[(kind, key)] = (now + self.cache_ttl, value)
        return value

    # -- questions -----------------------------------------------------------------

    def layer(self, digest: str) -> LayerPresence | None:
        return self._cached("layer", digest, lambda: find_layer(self.layout, digest))

    def layer_by_diff_id(self, diff_id: str) -> LayerPresence | None:
        return self._cached("diffid", diff_id, lambda: find_layer_by_diff_id(self.layout, diff_id))

    def chain(self, chain_id: str) -> Path | None:
        return self._cached("chain", chain_id, lambda: find_chain(self.layout, chain_id))

    def is_dir(self, path: str) -> bool:
        """Is a directory we serve from still there? (Mounts re-validates with this.)"""
        return self._cached("dir", path, lambda: Path(path).is_dir())

    def stat_mode_owner(self, path: str) -> tuple[int, int, int]:
        def probe() -> tuple[int, int, int]:
            st = os.stat(path)
            return st.st_mode, st.st_uid, st.st_gid

        return self._cached("stat", path, probe)

    def published(self, registry: str, repository: str, tag: str, want: Platform) -> list[PublishedFiles]:
        """The tag's metadata files, where the publisher put them for `want` (its platform
        dir) and for the repository's default platform (the top level). Read fresh, in one
        bounded question: tags move, and the caller checks every byte against a digest."""
        try:
            dirs = [self.layout.for_platform(want.os, want.architecture, want.variant), self.layout]
            paths = [lay.manifest_json(registry, repository, tag) for lay in dirs]
        except (LayoutError, ValueError):
            return []  # a name the repository cannot hold is not in it

        def read() -> list[PublishedFiles]:
            found = []
            for manifest in paths:
                files = PublishedFiles(_small(manifest, MAX_MANIFEST), _small(manifest.parent / CONFIG_JSON, MAX_CONFIG),
                                       _small(manifest.parent / INDEX_JSON, MAX_MANIFEST), str(manifest.parent))
                if files.manifest is not None:
                    found.append(files)
            return found

        return self._run(f"metadata of {registry}/{repository}:{tag}", read)

    def owns(self, path: str) -> bool:
        root = str(self.root).rstrip("/") + "/"
        return path.startswith(root)

    def close(self) -> None:
        with self._lock:
            worker, self._worker, self._closed = self._worker, None, True
        if worker is not None:
            worker.retire()


class _Worker:
    """One prober thread and its queue. A daemon thread, not a ThreadPoolExecutor: executor
    threads are joined at exit, so a thread stuck in a hung FUSE stat would keep the process
    from stopping."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def retire(self) -> None:
        """End after the questions queued so far."""
        self.jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting RPC
                future.set_exception(e)
