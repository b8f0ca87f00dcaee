"""``loop``: keep a repository in sync, unattended.

    round: re-read the wishlists -> convert (lock, HEAD per tag, publish what moved)
    then wait for the next round (--interval, start to start), a registry push event
    (--listen), or a stop signal

* One thread does all the work, so two rounds (or a round and a push conversion)
  never overlap; pushes arriving during a round are queued and converted after it.
* A round with failures (registry down, network, full disk, a broken image: each
  logged with the image by the converter) is retried after --backoff, doubling up to
  --interval; a round that finds another publisher (gc, a manual convert) holding the
  lock waits for it. Only a signal ends the loop.
* SIGTERM/SIGINT: stop before the next image, exit 0. The current image may finish
  within --stop-timeout; then its registry I/O is aborted (``on_abort``), so a stuck
  download cannot hold the stop. A second signal aborts at once and interrupts (still
  crash-safe: the next run cleans ``.tmp/``).
* Push events (webhook.py) name a registry host, repository and tag; a tag some
  wishlist entry names (a glob matches too) is converted at once, with that entry's
  platforms, so a push is live within seconds instead of at the next round. Pending
  pushes are de-duplicated and bounded (``max_pending``): when more arrive, the extra
  ones are dropped and a full round runs instead, which misses nothing.
* Nothing from outside ends the loop: an event that cannot be matched is dropped and
  counted; any other error in the loop itself is logged and retried after --backoff.
"""

from __future__ import annotations

import fnmatch
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.oci.platform import Platform

from publisher.sync.metrics import PublisherMetrics
from publisher.core.clock import Clock, SystemClock
from publisher.core.progress import ItemHooksProgress, Progress, Summary
from publisher.sync.ratelog import RateLimitedLog
from publisher.core.runlock import Busy, LockError, exclusive
from publisher.sync.webhook import ListenerLimits, PushEvent, WebhookListener
from publisher.sync.wishlist import Wishlist, WishlistEntry, WishlistError, load_wishlists

log = logging.getLogger(__name__)

BUSY_RETRY = 2.0  # seconds between tries while another publisher holds the lock
WAIT_SLICE = 0.5  # the longest a stop request waits to be noticed when idle
STOP_POLL = 0.2  # how often the stop watchdog looks at the signal count
MAX_PENDING = 1000  # distinct push events waiting; beyond, a full round instead
PUSH_SETTLE = 0.3  # the registry notifies a push a moment before the tag answers HEAD
PUSH_RETRIES = (1.0, 3.0, 10.0)  # delays before trying a failed push conversion again

# (wishlist, its entries to convert, default platform, progress, command) -> summary;
# raises Busy when another publisher holds the lock
ConvertFn = Callable[[Wishlist, Sequence[WishlistEntry], Platform, Progress, str], Summary]


class ListenError(RuntimeError):
    """The webhook or metrics address cannot be listened on."""


class _Stop(Exception):
    """A stop was requested: raised before the next image starts."""


class _StoppableProgress(ItemHooksProgress):
    """... and the one place to stop between two images."""

    def __init__(self, should_stop: Callable[[], bool], live: bool | None,
                 on_item: Callable[[str | None], None] | None = None) -> None:
        super().__init__(live, on_item)
        self._should_stop = should_stop

    def start_item(self, position: str, name: str) -> None:
        if self._should_stop():
            raise _Stop()
        super().start_item(position, name)


class PendingPushes:
    """Push events handed over by the listener's thread: de-duplicated, at most
    ``limit``; what does not fit is dropped and counted (the loop then runs a round)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._events: dict[PushEvent, None] = {}
        self._dropped = 0
        self._ready = threading.Event()

    def add(self, events: Sequence[PushEvent]) -> int:
        """Queue ``events``; returns how many were dropped for want of room."""
        dropped = 0
        with self._lock:
            for ev in events:
                if ev in self._events:
                    continue
                if len(self._events) >= self.limit:
                    dropped += 1
                    continue
                self._events[ev] = None
            self._dropped += dropped
            if self._events or self._dropped:
                self._ready.set()
        return dropped

    def wait(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def take(self) -> tuple[list[PushEvent], int]:
        """(the queued events, how many were dropped since the last take)."""
        with self._lock:
            events, dropped = list(self._events), self._dropped
            self._events.clear()
            self._dropped = 0
            self._ready.clear()
        return events, dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


def loop_lock_path(state_db: Path) -> Path:
    """Held for a loop's whole life: a second loop on the same state refuses to start."""
    return state_db.with_name(state_db.name + ".loop.lock")


def _host_key(host: str) -> str:
    host = host.lower()
    for default in (":443", ":80"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def wanted_by(event: PushEvent, entries: Sequence[WishlistEntry]) -> list[WishlistEntry]:
    """The wishlist entries a push concerns, each narrowed to the pushed tag."""
    out: list[WishlistEntry] = []
    host = _host_key(event.host)
    for entry in entries:
        ref = entry.reference
        if ref.repository != event.repository or host not in {_host_key(ref.registry), _host_key(ref.api_host)}:
            continue
        if ref.digest is not None:  # pinned: only a push of that very manifest matters
            if event.digest == ref.digest:
                out.append(entry)
        elif event.tag is not None and ref.tag is not None and fnmatch.fnmatchcase(event.tag, ref.tag):
            out.append(WishlistEntry(ref.with_tag(event.tag), entry.platforms, entry.source))
    return out


@dataclass(frozen=True)
class LoopSettings:
    wishlists: Sequence[Path]
    interval: float  # seconds, start to start
    backoff: float  # first retry delay after a failing round; doubles up to interval
    stop_timeout: float = 120.0  # after a stop request, the current image's registry I/O is aborted after this
    max_pending: int = MAX_PENDING


class Loop:
    def __init__(self, settings: LoopSettings, convert: ConvertFn, wishlist: Wishlist, *,
                 metrics: PublisherMetrics | None = None, live_progress: bool | None = False,
                 on_abort: Callable[[str], None] | None = None,
                 on_item: Callable[[str | None], None] | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        self._convert = convert
        self._wishlist = wishlist  # the last valid one
        self.metrics = metrics
        self._live = live_progress
        self._on_abort = on_abort  # aborts the registry I/O in flight (a stop that cannot wait)
        self._on_item = on_item  # arms the per-image deadline
        self.stopping = False  # set from signal handlers: plain values, no locks there
        self._signals = 0
        self._stop_requested_at = 0.0
        self._converting = False
        self._inbox = PendingPushes(settings.max_pending)
        self._pending: dict[PushEvent, None] = {}
        self._push_tries: dict[PushEvent, int] = {}
        self._dropped_log = RateLimitedLog(log, logging.WARNING)
        self._unwanted_log = RateLimitedLog(log, logging.INFO, burst=30)
        self._pending_at = 0.0
        self._next_round = 0.0
        self._failures = 0
        self.rounds = 0

    # -- called from other threads / signal handlers ---------------------------------
    def push(self, events: Sequence[PushEvent]) -> None:
        dropped = self._inbox.add(events)
        if dropped:
            self._count_dropped("overflow", dropped)
            self._dropped_log("%d push events pending: dropped %d more; a full round will look at everything",
                              len(self._inbox), dropped)

    def _count_dropped(self, reason: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.push_events_dropped.labels(reason).inc(n)

    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        self._signals += 1
        if not self.stopping:
            self._stop_requested_at = self._clock.monotonic()
        self.stopping = True
        if self._signals > 1:
            raise KeyboardInterrupt  # asked twice: do not wait for the current image (the watchdog aborts its I/O)

    def watch_stop(self, done: threading.Event) -> None:
        """A thread's body (serve() runs it): once a stop was requested, give the current
        image --stop-timeout (no time at all after a second signal), then abort its
        registry I/O -- a download trickling forever must not hold the stop."""
        while not done.wait(STOP_POLL):
            if not self.stopping or not self._converting:
                continue
            waited = self._clock.monotonic() - self._stop_requested_at
            if self._signals > 1 or waited >= self.settings.stop_timeout:
                why = "a second stop signal" if self._signals > 1 else \
                    f"stop requested {waited:.0f} s ago (--stop-timeout)"
                log.warning("%s: aborting the current image's registry transfers", why)
                if self._on_abort is not None:
                    self._on_abort(f"aborted: {why}")
                return

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        self._next_round = self._clock.monotonic()
        while not self.stopping:
            now = self._clock.monotonic()
            try:
                if self._pending and now >= self._pending_at:
                    self._pushes()
                elif now >= self._next_round:
                    self._round()
                else:
                    wake = min(self._next_round, self._pending_at) if self._pending else self._next_round
                    self._wait(wake - now)
            except Exception:  # noqa: BLE001 - a bug here must not end the service: log, back off, go on
                log.exception("loop: unexpected error")
                self._fail_kind("round")
                self._retry_soon(after_round=True)
        log.info("loop stopped after %d rounds", self.rounds)

    def _wait(self, timeout: float) -> None:
        if not self._clock.wait(self._inbox.wait, max(0.0, min(timeout, WAIT_SLICE))):
            return
        events, dropped = self._inbox.take()
        if events and not self._pending:
            self._pending_at = self._clock.monotonic() + PUSH_SETTLE
        for ev in events:
            if len(self._pending) >= self.settings.max_pending and ev not in self._pending:
                dropped += 1
                continue
            self._pending[ev] = None
        if dropped:  # some pushes were not kept: a round looks at every wishlist entry
            self._next_round = min(self._next_round, self._clock.monotonic())

    def _progress(self) -> Progress:
        return _StoppableProgress(lambda: self.stopping, self._live, self._on_item)

    def _read_wishlists(self) -> Wishlist:
        try:
            self._wishlist = load_wishlists(self.settings.wishlists)
        except WishlistError as e:
            log.error("the wishlists are invalid now; going on with the last valid ones:\n%s", e)
            self._fail_kind("wishlist")
        return self._wishlist

    def _fail_kind(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.failures.labels(kind).inc()

    def _run(self, wishlist: Wishlist, entries: Sequence[WishlistEntry], command: str) -> Summary | str:
        """One convert call; a Summary, or "busy" / "stopped" / "error"."""
        self._converting = True
        try:
            return self._convert(wishlist, entries, wishlist.default_platform, self._progress(), command)
        except _Stop:
            log.info("stop requested: stopped between two images")
            return "stopped"
        except Busy as e:
            log.info("%s; trying again in %.0f s", e, BUSY_RETRY)
            return "busy"
        except LockError as e:  # (said plainly: a traceback adds nothing)
            log.error("%s failed: %s", command, e)
            self._fail_kind("round")
            return "error"
        except Exception:  # noqa: BLE001 - the loop outlives any one failure
            log.exception("%s failed", command)
            self._fail_kind("round")
            return "error"
        finally:
            self._converting = False

    def _round(self) -> None:
        started = self._clock.monotonic()
        self._next_round = started + self.settings.interval
        wishlist = self._read_wishlists()
        n = self.rounds + 1
        log.info("round %d: %d wishlist entries", n, len(wishlist.entries))
        result = self._run(wishlist, wishlist.entries, "loop")
        if result == "stopped":
            return
        if result == "busy":
            self._next_round = self._clock.monotonic() + BUSY_RETRY
            return
        self.rounds = n
        ok = isinstance(result, Summary) and result.ok
        if isinstance(result, Summary):
            for line in result.render().splitlines():
                log.log(logging.INFO if result.ok else logging.WARNING, "round %d: %s", n, line.strip())
            if self.metrics is not None:
                self.metrics.record(result, full_round=True)
        if ok:
            self._failures = 0
        else:
            self._retry_soon(after_round=True)

    def _retry_soon(self, after_round: bool) -> None:
        """Something failed: the next round comes after the backoff (a push conversion
        that failed keeps an earlier planned round)."""
        self._failures += 1
        delay = min(self.settings.interval, self.settings.backoff * 2 ** (self._failures - 1))
        retry = self._clock.monotonic() + delay
        self._next_round = retry if after_round else min(self._next_round, retry)
        log.info("failures: next round in %.0f s", self._next_round - self._clock.monotonic())

    def _pushes(self) -> None:
        events = list(self._pending)
        self._pending.clear()
        wishlist = self._read_wishlists()
        entries: dict[tuple, WishlistEntry] = {}
        for ev in events:
            try:
                wanted = wanted_by(ev, wishlist.entries)
            except Exception as e:  # noqa: BLE001 - e.g. a name the listener let through that a wishlist rejects
                self._count_dropped("invalid")
                self._dropped_log("push of %r dropped: %s", str(ev)[:300], e)
                continue
            if self.metrics is not None:
                self.metrics.pushes.labels("yes" if wanted else "no").inc()
            if not wanted:
                self._unwanted_log("push of %s: no wishlist names it", ev)
            for entry in wanted:
                old = entries.get(entry.key)
                plats = entry.platforms if old is None else \
                    old.platforms + tuple(p for p in entry.platforms if p not in old.platforms)
                entries[entry.key] = WishlistEntry(entry.reference, plats, entry.source)
        if not entries:
            return
        started = self._clock.monotonic()
        result = self._run(wishlist, list(entries.values()), "loop-push")
        if result == "busy":
            for ev in events:
                self._pending[ev] = None
            self._pending_at = self._clock.monotonic() + BUSY_RETRY
            return
        if isinstance(result, Summary):
            names = ", ".join(e.reference.spelling for e in entries.values())
            log.info("pushed %s: %s (%.1f s)", names, result.render().splitlines()[0], self._clock.monotonic() - started)
            for line in result.render().splitlines()[1:]:
                log.warning("pushed: %s", line.strip())
            if self.metrics is not None:
                self.metrics.record(result, full_round=False)
            if result.ok:
                for ev in events:
                    self._push_tries.pop(ev, None)
                return
        if result == "stopped":
            return
        # The registry notifies while it is still linking the tag (a HEAD right away can
        # 404): try a failed push again a few times soon, then leave it to the rounds.
        again = []
        for ev in events:
            tries = self._push_tries.pop(ev, 0)
            if tries < len(PUSH_RETRIES) and len(self._push_tries) < self.settings.max_pending:
                self._push_tries[ev] = tries + 1
                again.append((tries, ev))
        if again:
            delay = PUSH_RETRIES[min(t for t, _ in again)]
            log.info("trying the failed pushes again in %.0f s", delay)
            for _, ev in again:
                self._pending[ev] = None
            self._pending_at = self._clock.monotonic() + delay
        else:
            self._retry_soon(after_round=False)  # the next round retries it


def serve(loop: Loop, *, lock_path: Path, listen: str | None = None, metrics_address: str | None = None,
          token: str | None = None, limits: ListenerLimits = ListenerLimits()) -> None:
    """Run ``loop`` until a signal: one loop per state (``lock_path``), the webhook
    listener (requiring ``token`` when given) and the metrics endpoint around it.
    Raises Busy if another loop runs, ListenError if an address cannot be listened on."""
    with exclusive(lock_path):
        try:
            if metrics_address and loop.metrics is not None:
                host, port = loop.metrics.serve(metrics_address)
                log.info("metrics on http://%s:%d/metrics", host, port)
            on_count = loop.metrics.count_webhook if loop.metrics is not None else None
            listener = WebhookListener(listen, loop.push, token=token, limits=limits,
                                       on_count=on_count).start() if listen else None
        except OSError as e:  # e.g. the port is taken
            raise ListenError(f"cannot listen on {e.filename or listen or metrics_address}: {e.strerror or e}") from e
        handlers: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, loop.request_stop)
        done = threading.Event()
        watchdog = threading.Thread(target=loop.watch_stop, args=(done,), name="stop-watchdog", daemon=True)
        watchdog.start()
        try:
            loop.run()
        finally:
            done.set()
            for sig, old in handlers.items():
                signal.signal(sig, old)  # type: ignore[arg-type]
            if listener is not None:
                listener.stop()
