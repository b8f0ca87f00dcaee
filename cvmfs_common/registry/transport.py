"""The HTTP side of the registry client: one ``requests.Session``, retries with back-off on
transient failures (``Retry-After`` honoured), timeouts and deadlines, the 401 round trip
through an :class:`Authorizer`, and bodies read capped and watched (:mod:`.watchdog`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import requests
import urllib3.exceptions

from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import (AuthenticationError, DeadlineExceeded, NotFound, RegistryError,
                                          RetriesExhausted)
from cvmfs_common.registry.limits import Deadline, RetryPolicy, TransferLimits
from cvmfs_common.registry.watchdog import Transfer, Watchdog

# A connection that broke or timed out: worth another attempt (or a resume).
TRANSIENT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
)

_TIMEOUT_EXC = (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError)


class Authorizer(Protocol):
    """What the transport asks of the authorizer (authorizer.TokenAuthorizer)."""

    def header(self, ref: Reference, scope: str, deadline: Deadline | None) -> str | None:
        """The Authorization header for ``scope``, if the registry asked for one before."""

    def challenged(self, ref: Reference, scope: str, challenge: str, what: str, deadline: Deadline | None) -> None:
        """A 401 with this ``WWW-Authenticate``: prepare the next attempt's header, or raise
        AuthenticationError."""


class Transport:
    """Requests with retries and bounds. Thread-safe (one session; the watchdog is locked)."""

    def __init__(self, session: requests.Session, retry: RetryPolicy, limits: TransferLimits,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.session = session
        self.retry = retry
        self.limits = limits
        self.sleep = sleep
        self.watchdog = Watchdog(limits)

    def close(self) -> None:
        self.watchdog.close()
        self.session.close()

    def send(
        self,
        ref: Reference,
        method: str,
        url: str,
        *,
        auth: Authorizer | None = None,
        scope: str | None = None,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One logical request: auth for ``scope`` (401 -> challenge -> retry once) and retries on
        transient failures. Returns the final response (caller checks the status).
        ``deadline``: the request, its token fetch and its retries all end by then
        (DeadlineExceeded), whatever the timeouts allow."""
        timeout = (self.retry.connect_timeout, self.retry.read_timeout)
        # Bodies are always streamed, so that they are read through read_limited (capped),
        # never whole by requests; HEADs have none (and keep their connection for reuse).
        stream = stream or method != "HEAD"
        attempt = 0
        authed_after_challenge = False
        while True:
            self.watchdog.check_now(ref, f"{method} {url}")
            if deadline is not None:
                left = deadline[0] - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(ref, f"{method} {url}: no answer within {deadline[1]}")
                timeout = (min(self.retry.connect_timeout, left), min(self.retry.read_timeout, left))
            hdrs = dict(headers or {})
            if auth is not None and scope is not None and "Authorization" not in hdrs:
                header = auth.header(ref, scope, deadline)
                if header:
                    hdrs["Authorization"] = header
            try:
                resp = self.session.request(method, url, headers=hdrs, stream=stream, timeout=timeout, **kwargs)
            except TRANSIENT_ERRORS as e:
                if attempt + 1 >= self.retry.attempts:
                    raise RetriesExhausted(ref, f"{method} {url}: {type(e).__name__}: {e}") from e
                delay = self.retry.delay(attempt)
                if deadline is not None and time.monotonic() + delay >= deadline[0]:
                    happened = "timed out" if isinstance(e, _TIMEOUT_EXC) else f"failed ({type(e).__name__})"
                    raise DeadlineExceeded(ref, f"{method} {url}: {happened}, and no answer within "
                                                f"{deadline[1]}") from e
                self.sleep(delay)
                attempt += 1
                continue
            except requests.RequestException as e:
                raise RegistryError(ref, f"{method} {url}: {e}") from e

            if resp.status_code == 401 and auth is not None and scope is not None and not authed_after_challenge:
                challenge = resp.headers.get("WWW-Authenticate", "")
                self.discard(ref, resp)
                auth.challenged(ref, scope, challenge, f"{method} {url}", deadline)
                authed_after_challenge = True
                continue
            if _is_transient_status(resp.status_code):
                wait = _retry_after_seconds(resp)
                if attempt + 1 >= self.retry.attempts:
                    status = resp.status_code
                    resp.close()
                    raise RetriesExhausted(ref, f"{method} {url}: HTTP {status} after {attempt + 1} attempts", status=status)
                self.discard(ref, resp)
                delay = self.retry.delay(attempt) if wait is None else min(wait, self.retry.max_retry_after)
                if deadline is not None and time.monotonic() + delay >= deadline[0]:
                    raise DeadlineExceeded(ref, f"{method} {url}: HTTP {resp.status_code}, and no answer within "
                                                f"{deadline[1]}", status=resp.status_code)
                self.sleep(delay)
                attempt += 1
                continue
            return resp

    def raise_for_status(self, ref: Reference, resp: requests.Response, what: str) -> None:
        """An error status as a RegistryError (401/403 AuthenticationError, 404 NotFound) with the
        registry's own message when its body has one."""
        code = resp.status_code
        if code < 400:
            return
        detail = ""
        try:
            if resp.request is not None and resp.request.method != "HEAD":
                errs = json.loads(self.read_limited(ref, resp, self.limits.max_error_bytes, f"HTTP {code} body"))
                errs = errs.get("errors") or []
                detail = "; ".join(f"{e.get('code')}: {e.get('message')}"[:500] for e in errs[:5] if isinstance(e, dict))
        except (ValueError, AttributeError, TypeError, RecursionError, RegistryError, requests.RequestException):
            pass  # the status alone says enough
        resp.close()
        msg = f"{what}: HTTP {code}" + (f" ({detail})" if detail else "")
        if code in (401, 403):
            raise AuthenticationError(ref, msg, status=code)
        if code == 404:
            raise NotFound(ref, msg, status=code)
        raise RegistryError(ref, msg, status=code)

    def read_body(self, t: Transfer, resp: requests.Response, size: int) -> Iterator[bytes]:
        """The body as it arrives (one recv per chunk, so the counters are fine-grained)."""
        t.resp = resp
        t.raise_failure()  # the watchdog may have failed it before this response existed
        read1 = getattr(resp.raw, "read1", None)
        while True:
            data = read1(size, decode_content=True) if read1 is not None else resp.raw.read(size, decode_content=True)
            if not data:
                resp._content_consumed = True  # read to the end: requests may pool the connection again
                return
            t.received += len(data)
            yield data

    def read_limited(self, ref: Reference, resp: requests.Response, limit: int, what: str) -> bytes:
        """The whole body, or RegistryError when it is over ``limit`` bytes (read no
        further) or arrives too slowly (TransferLimits: the watchdog)."""
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RegistryError(ref, f"{what} is {declared} bytes, over the limit of {limit}")
        buf = bytearray()
        with self.watchdog.tracked(ref, what) as t:
            try:
                for chunk in self.read_body(t, resp, 64 * 1024):
                    buf += chunk
                    if len(buf) > limit:
                        raise RegistryError(ref, f"{what} is larger than {limit} bytes")
                t.raise_failure()
            except TRANSIENT_ERRORS as e:
                t.raise_failure()
                raise RegistryError(ref, f"{what}: connection dropped: {e}") from e
            finally:
                t.resp = None
        return bytes(buf)

    def discard(self, ref: Reference, resp: requests.Response) -> None:
        """Read and drop a small body (a challenge, a 5xx page) so that the connection
        can be reused; a large or slow one just closes it."""
        try:
            self.read_limited(ref, resp, self.limits.max_error_bytes, f"HTTP {resp.status_code} body")
        except (RegistryError, requests.RequestException):
            pass
        finally:
            resp.close()


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
