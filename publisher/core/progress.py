"""Progress display and the end summary of a convert run.

Per image one log line when it is done; on a terminal also a live status line
(bytes downloaded, current image) redrawn at most a few times a second.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TextIO

from publisher.core.outcome import FailureKind, Outcome
from publisher.core.state import RunCounts

OUTCOMES = tuple(o.value for o in Outcome)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


@dataclass(frozen=True)
class ItemResult:
    """The outcome for one tag and platform."""

    name: str  # registry/repo:tag (platform)
    outcome: Outcome
    detail: str = ""
    layers_fetched: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failure: FailureKind | None = None  # set with Outcome.FAILED (None counts as "other")


@dataclass
class Summary:
    started: float = field(default_factory=time.monotonic)
    results: list[ItemResult] = field(default_factory=list)
    invalid_tags: int = 0  # names in a registry's tag list that are no valid tag (skipped)

    def add(self, result: ItemResult) -> None:
        self.results.append(result)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    @property
    def layers_fetched(self) -> int:
        return sum(r.layers_fetched for r in self.results)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.outcome == Outcome.FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed

    def run_counts(self) -> RunCounts:
        return RunCounts(self.count(Outcome.NEW), self.count(Outcome.UPDATED), self.count(Outcome.UNCHANGED),
                         self.count(Outcome.FAILED), self.count(Outcome.SKIPPED), self.bytes)

    def render(self) -> str:
        elapsed = time.monotonic() - self.started
        counts = ", ".join(f"{self.count(o)} {o}" for o in Outcome)
        lines = [
            f"{len(self.results)} images: {counts}; "
            f"{self.layers_fetched} layers fetched ({human_bytes(self.bytes)}); {elapsed:.1f} s"
        ]
        if self.invalid_tags:
            lines.append(f"  skipped {self.invalid_tags} invalid tag name{'' if self.invalid_tags == 1 else 's'} "
                         "from registry tag lists")
        for r in self.failed:
            lines.append(f"  FAILED {r.name}: {r.detail}")
        return "\n".join(lines)


class Progress:
    """Thread-safe byte counter with an optional live line on a terminal."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, interval: float = 0.25) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval
        self._lock = threading.Lock()
        self._bytes = 0
        self._current = ""
        self._position = ""
        self._last_draw = 0.0
        self._drawn = False

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n
        self._maybe_draw()

    def start_item(self, position: str, name: str) -> None:
        with self._lock:
            self._position, self._current = position, name
        self._maybe_draw(force=True)

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_draw < self.interval:
                return
            self._last_draw = now
            line = f"[{self._position}] {self._current}  {human_bytes(self._bytes)} fetched"
            self.stream.write("\r\x1b[K" + line[:200])
            self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        """Remove the live line (before a log line or the summary)."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._drawn = False


class ItemHooksProgress(Progress):
    """The converter announces every image through ``start_item`` before it touches it
    and calls ``clear`` after it: where a per-image deadline is armed and disarmed
    (``on_item(name)`` / ``on_item(None)``) without reaching into the converter."""

    def __init__(self, live: bool | None, on_item: Callable[[str | None], None] | None = None) -> None:
        super().__init__(live=live)
        self._on_item = on_item

    def start_item(self, position: str, name: str) -> None:
        super().start_item(position, name)
        if self._on_item is not None:
            self._on_item(name)

    def clear(self) -> None:
        if self._on_item is not None:
            self._on_item(None)
        super().clear()
