"""What the registry client may wait for and hold: the retry policy, the transfer bounds, a
deadline. Plain values, shared by the transport, the watchdog and the callers that tune them."""

from __future__ import annotations

import random
from dataclasses import dataclass

# urllib3 drops a partly filled read when the connection breaks, so a resume
# restarts at most one chunk back: keep chunks moderate.
DEFAULT_CHUNK = 256 * 1024

# A deadline: (time.monotonic() when it passes, what it is -- named in the error).
Deadline = tuple[float, str]


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
