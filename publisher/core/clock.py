"""Time as the loop sees it: injectable, so its schedule (back-off, retries, the push settle
time) can be checked against a clock the test moves instead of the wall clock."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    def wait(self, ready: Callable[[float], bool], timeout: float) -> bool:
        """`ready(timeout)`: wait for something (e.g. Event.wait) at most `timeout` seconds."""


class SystemClock:
    """The real one: time.monotonic and a real wait."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, ready: Callable[[float], bool], timeout: float) -> bool:
        return ready(timeout)
