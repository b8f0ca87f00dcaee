"""Log lines that outside input can cause, at a bounded rate.

A flood of junk (forged webhook events, say) must not turn into a flood of log
lines: at most ``burst`` lines per ``period``; the rest are counted and the
count is logged with the next line that gets through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, level: int, *, burst: int = 10, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._level = level
        self._burst = burst
        self._period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0  # since the last line that got through

    def __call__(self, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log (or count) one line; True when it was logged."""
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self._period:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self._burst:
                self.suppressed += 1
                return False
            self._in_window += 1
            suppressed, self.suppressed = self.suppressed, 0
        if suppressed:
            msg += " (%d similar lines suppressed before this one)"
            args = (*args, suppressed)
        self._logger.log(self._level, msg, *args, exc_info=exc_info)
        return True
