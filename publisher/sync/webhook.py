"""Registry push notifications for ``loop --listen HOST:PORT`` (docs/DESIGN.md#webhook).

The distribution registry (``docker-registry``) POSTs to every URL in its config's
``notifications.endpoints`` an envelope::

    {"events": [{"action": "push",
                 "target": {"repository": "test/app", "tag": "v1", "digest": "sha256:...",
                            "mediaType": "application/vnd.oci.image.manifest.v1+json", "url": ...},
                 "request": {"host": "registry.example.org:5000", ...}, ...}]}

The listener accepts such POSTs on any path, answers 200 at once and hands the
manifest pushes to a callback; the loop decides (against the wishlists) what to
convert. An event only ever triggers a conversion of a tag the wishlists name, which
is then read from the registry as usual: a forged event can make the publisher look,
never publish something else.

The port faces the network, so nothing a client sends may cost more than a bounded
amount of memory, file descriptors or time, or end the process:

* one asyncio event loop in one thread (h11 parses HTTP/1.1); at most
  ``max_connections`` connections: when full, the one that has waited longest for its
  request head is dropped for the newcomer (a legitimate POST arrives whole at once, a
  slowloris connection never does), else the newcomer gets a 503;
* every request (head and body) must arrive within ``request_timeout``, an idle
  keep-alive connection is closed after ``idle_timeout``;
* with a token (``--listen-token-file``), a request without ``Authorization: Bearer
  <token>`` (compared in constant time) gets a 401 before its body is read;
* a body over ``max_body`` gets a 413 before it is read; heads over ``max_head`` a 431;
* invalid JSON (deep nesting included) is a 400; an event with an invalid repository,
  tag, digest or host is dropped on its own and counted (the others are used).
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from cvmfs_common.address import parse_address
from cvmfs_common.oci.digest import InvalidDigest, parse_digest
from cvmfs_common.oci.reference import InvalidReference, validate_registry, validate_repository, validate_tag
from cvmfs_common.oci.media import IMAGE_MANIFESTS, INDEXES

from publisher.sync.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

_MANIFEST_TYPES = IMAGE_MANIFESTS | INDEXES


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int = 32
    request_timeout: float = 10.0  # seconds for one request's head and body
    idle_timeout: float = 15.0  # seconds a keep-alive connection may wait for its next request
    max_body: int = 1024 * 1024  # an envelope of a few events is a few kB
    max_head: int = 16 * 1024


class Outcome(enum.Enum):
    """What became of one request (a metric label)."""

    ACCEPTED = "accepted"
    PROBE = "probe"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    BAD_REQUEST = "bad_request"
    TIMEOUT = "timeout"
    OVER_CAPACITY = "over_capacity"


OUTCOMES = tuple(o.value for o in Outcome)


@dataclass(frozen=True)
class PushEvent:
    """A manifest pushed to a registry."""

    host: str  # the registry as the pusher addressed it (request.host), lower case
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        where = f":{self.tag}" if self.tag else f"@{self.digest}"
        return f"{self.host}/{self.repository}{where}"


@dataclass
class Envelope:
    """The manifest pushes of one notification, and why other push events were dropped."""

    events: list[PushEvent] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _push_event(ev: dict) -> PushEvent | None:
    """A manifest push as a PushEvent, None for other events; InvalidReference when a
    manifest push names something no registry could (a forged or broken event)."""
    if ev.get("action") != "push":
        return None
    target = ev.get("target") if isinstance(ev.get("target"), dict) else {}
    media_type = target.get("mediaType")
    if media_type and media_type not in _MANIFEST_TYPES:
        return None  # a blob
    repository, tag, digest = target.get("repository"), target.get("tag"), target.get("digest")
    if tag in (None, "") and digest in (None, ""):
        return None  # nothing to look at
    validate_repository(repository)
    if tag not in (None, ""):
        validate_tag(tag)
    else:
        tag = None
    if digest not in (None, ""):
        try:
            digest = str(parse_digest(digest))
        except InvalidDigest as e:
            raise InvalidReference(str(e)) from None
    else:
        digest = None
    request = ev.get("request") if isinstance(ev.get("request"), dict) else {}
    host = request.get("host") if isinstance(request.get("host"), str) else ""
    if not host and isinstance(target.get("url"), str):
        host = urllib.parse.urlsplit(target["url"]).netloc
    validate_registry(host)
    return PushEvent(host.lower(), repository, tag, digest)


def parse_envelope(body: bytes) -> Envelope:
    """The manifest pushes in a notification envelope; other events (pulls, blob
    pushes, deletes) are left out, invalid pushes listed in ``invalid``.
    ValueError when the body is not an envelope."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError("not a notification envelope (no 'events' list)")
    out = Envelope()
    for ev in events:
        if not isinstance(ev, dict):
            continue
        try:
            push = _push_event(ev)
        except InvalidReference as e:
            target = ev.get("target") if isinstance(ev.get("target"), dict) else {}
            why = str(e) if len(str(e)) <= 100 else str(e)[:97] + "..."
            out.invalid.append(f"{why} (repository {_short(target.get('repository'))}, tag {_short(target.get('tag'))})")
            continue
        if push is not None:
            out.events.append(push)
    return out


_PROBE_TEXT = b"cvmfs-publisher loop: POST registry notifications here\n"


class _Reject(Exception):
    """Answer this and close the connection."""

    def __init__(self, outcome: Outcome, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(text)
        self.outcome, self.status, self.text, self.headers = outcome, status, text, headers


@dataclass(eq=False)
class _Conn:
    task: "asyncio.Task[None] | None"
    writer: asyncio.StreamWriter
    peer: str
    waiting_since: float | None  # monotonic time it started waiting for a request head; None while busy


class WebhookListener:
    """``listener = WebhookListener("0.0.0.0:8080", on_events, token=...).start()`` ... ``stop()``.

    ``on_events`` runs on the listener's thread: keep it short (queue the events).
    ``on_count(what, n)`` (optional) is told every request's Outcome value and, as
    ``"invalid_event"``, every dropped event: the metrics hook. ``stats`` holds the same
    counts. The address is bound in the constructor (OSError when it cannot be)."""

    def __init__(self, address: str, on_events: Callable[[list[PushEvent]], None], *, token: str | None = None,
                 limits: ListenerLimits = ListenerLimits(),
                 on_count: Callable[[str, int], None] | None = None) -> None:
        self.limits = limits
        self._on_events = on_events
        self._expected = f"Bearer {token}".encode() if token else None
        self._on_count = on_count
        self.stats: dict[str, int] = {name: 0 for name in (*OUTCOMES, "invalid_event")}
        self._conns: set[_Conn] = set()
        self._rejected_log = RateLimitedLog(log, logging.WARNING)
        self._pushed_log = RateLimitedLog(log, logging.INFO, burst=30)
        self._loop = asyncio.new_event_loop()
        host, port = parse_address(address)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._connection, host, port, reuse_address=True, backlog=128,
                family=socket.AF_INET6 if ":" in host else socket.AF_INET))
        except BaseException:
            self._loop.close()
            raise
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> "WebhookListener":
        self._thread.start()
        log.info("listening for registry notifications on %s:%d%s", *self.address,
                 "" if self._expected else " (no token: any client can send events)")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        else:
            self._loop.run_until_complete(self._shutdown())
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] += n
        if self._on_count is not None:
            try:
                self._on_count(what, n)
            except Exception:  # noqa: BLE001 - counting never breaks serving
                log.debug("counting %s failed", what, exc_info=True)

    # -- one connection ------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str((writer.get_extra_info("peername") or ("?",))[0])
        if len(self._conns) >= self.limits.max_connections and not self._evict_one():
            self._count(Outcome.OVER_CAPACITY.value)
            self._rejected_log("webhook: %d connections open, refusing one from %s", len(self._conns), peer)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        conn = _Conn(asyncio.current_task(), writer, peer, time.monotonic())
        self._conns.add(conn)
        try:
            await self._serve(conn, reader, writer)
        except asyncio.CancelledError:  # evicted or shutting down
            writer.transport.abort()
        except Exception:  # noqa: BLE001 - no input may end the listener
            self._rejected_log("webhook: connection from %s failed", peer, exc_info=True)
            writer.transport.abort()
        finally:
            self._conns.discard(conn)
            writer.close()  # sends what is buffered (a few bytes at most), then frees the fd

    def _evict_one(self) -> bool:
        """Make room: drop the connection that has waited longest for a request head."""
        idle = [c for c in self._conns if c.waiting_since is not None and c.task is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.waiting_since)  # type: ignore[arg-type, return-value]
        self._conns.discard(oldest)
        oldest.task.cancel()  # type: ignore[union-attr]
        self._count(Outcome.TIMEOUT.value)
        return True

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        first = True
        while True:
            conn.waiting_since = time.monotonic()
            # the first request gets request_timeout from the connect, a later one idle_timeout to start
            wait = self.limits.request_timeout if first else self.limits.idle_timeout
            try:
                request = await asyncio.wait_for(self._next_event(h, reader), wait)
            except TimeoutError:
                if not first and h.their_state is h11.IDLE and not h.trailing_data[0]:
                    return  # an idle keep-alive connection: just close it
                self._count(Outcome.TIMEOUT.value)
                self._rejected_log("webhook: %s sent no complete request head in %.0f s; closed", conn.peer, wait)
                return
            except h11.RemoteProtocolError as e:
                await self._reject(h, reader, writer, _Reject(Outcome.BAD_REQUEST, e.error_status_hint, f"{e}\n"),
                                   conn.peer)
                return
            if type(request) is h11.ConnectionClosed:
                return
            conn.waiting_since = None
            first = False
            try:
                await asyncio.wait_for(self._handle(h, reader, writer, request, conn.peer),
                                       self.limits.request_timeout)
            except TimeoutError:
                self._count(Outcome.TIMEOUT.value)
                self._rejected_log("webhook: request from %s not complete in %.0f s; closed",
                                   conn.peer, self.limits.request_timeout)
                return
            except _Reject as r:
                await self._reject(h, reader, writer, r, conn.peer)
                return
            except h11.RemoteProtocolError as e:
                await self._reject(h, reader, writer, _Reject(Outcome.BAD_REQUEST, e.error_status_hint, f"{e}\n"),
                                   conn.peer)
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()

    @staticmethod
    async def _next_event(h: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(await reader.read(64 * 1024))

    async def _handle(self, h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      request: object, peer: str) -> None:
        if not isinstance(request, h11.Request):
            raise _Reject(Outcome.BAD_REQUEST, 400, "expected a request\n")
        if request.method in (b"GET", b"HEAD"):
            self._count(Outcome.PROBE.value)
            await self._answer(h, writer, 200, _PROBE_TEXT if request.method == b"GET" else b"")
            return
        if request.method != b"POST":
            raise _Reject(Outcome.BAD_REQUEST, 405, "POST registry notifications here\n", (("Allow", "GET, HEAD, POST"),))
        if self._expected is not None:
            got = b"".join(v for k, v in request.headers if k == b"authorization")
            if not hmac.compare_digest(got, self._expected):
                raise _Reject(Outcome.UNAUTHORIZED, 401, "a bearer token is required\n",
                              (("WWW-Authenticate", 'Bearer realm="cvmfs-publisher"'),))
        length = next((v for k, v in request.headers if k == b"content-length"), None)
        if length is not None and int(length) > self.limits.max_body:
            raise _Reject(Outcome.TOO_LARGE, 413, f"more than {self.limits.max_body} bytes\n")
        body = bytearray()
        while True:
            event = await self._next_event(h, reader)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body:  # chunked: no length up front
                    raise _Reject(Outcome.TOO_LARGE, 413, f"more than {self.limits.max_body} bytes\n")
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # the client went away mid-body
                raise _Reject(Outcome.BAD_REQUEST, 400, "incomplete body\n")
        try:
            envelope = parse_envelope(bytes(body))
        except ValueError as e:
            raise _Reject(Outcome.BAD_REQUEST, 400, f"{e}\n") from None
        self._count(Outcome.ACCEPTED.value)
        await self._answer(h, writer, 200, b"")  # at once: the registry's queue must never wait for a conversion
        if envelope.invalid:
            self._count("invalid_event", len(envelope.invalid))
            for why in envelope.invalid:
                self._rejected_log("webhook from %s: dropped an invalid push event: %s", peer, why)
        if envelope.events:
            self._pushed_log("webhook from %s: %s pushed", peer, ", ".join(map(str, envelope.events)))
            self._on_events(envelope.events)

    async def _answer(self, h: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes,
                      headers: tuple[tuple[str, str], ...] = (), close: bool = False) -> None:
        hdrs = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers]
        if close:
            hdrs.append(("Connection", "close"))
        data = h.send(h11.Response(status_code=status, headers=hdrs)) or b""
        if body:
            data += h.send(h11.Data(data=body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await writer.drain()

    async def _reject(self, h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      r: _Reject, peer: str) -> None:
        """Answer and close without reading what the client still sends -- but politely:
        closing with unread input would reset the connection and lose the answer."""
        self._count(r.outcome.value)
        self._rejected_log("webhook: %s from %s: %s", r.status, peer, r.text.strip())
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # an answer was started already: just close
        try:
            await asyncio.wait_for(self._answer(h, writer, r.status, r.text.encode(), r.headers, close=True), 2)
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(self._discard(reader, 256 * 1024), 1)
        except (TimeoutError, OSError, h11.LocalProtocolError):
            pass

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
        while limit > 0 and (data := await reader.read(min(limit, 64 * 1024))):
            limit -= len(data)
